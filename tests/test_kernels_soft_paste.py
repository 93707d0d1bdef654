"""dual_soft_paste: the Triton kernel (interpreter on CPU, compiled on a GPU) against its twin.

Shapes: B batch, C channels, H x W crop, K classes. Inputs and shapes come from bench/kernel_cases.py (shared with
the microbenchmarks): images in [0, 1), the range the trainers paste in.
Tolerances (images only; labels and masks must match exactly):
- float32: atol 1e-6. Interpreter and twin do the same float32 operations in the same order (bit-equal here);
  a GPU may contract lam*m*a + (1-lam*m)*d into FMAs, one rounding of values <= 1 (ulp 1.2e-7) apart.
- float16: atol 2e-3. The kernel rounds once from float32; the twin rounds each of its ~4 half-precision ops.
  Every intermediate is <= 1 in magnitude, so each rounding errs by <= 2**-11 = 4.9e-4: 4 of them < 2e-3.
- bfloat16 (GPU only; the interpreter computes bf16 wrongly): atol 1.6e-2, the same argument with 2**-8 = 3.9e-3.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from bench.kernel_cases import PASTE_GPU_SHAPES, PASTE_SHAPES, paste_inputs
from dsp_fast import kernels

twins = kernels.twins
sp_mod = kernels.soft_paste

ATOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (bf16 / compiled kernels)")


def check_against_twin(args: tuple, lam: float) -> tuple:
    out = sp_mod._dual_soft_paste_triton(*args, lam)
    ref = twins.dual_soft_paste(*args, lam)
    names = ("src_mix_img", "src_mix_label", "tgt_mix_img", "tgt_mix_label", "mask")
    for name, got, want in zip(names, out, ref):
        assert got.shape == want.shape and got.dtype == want.dtype, (name, got.dtype, want.dtype)
        atol = ATOL[got.dtype] if got.dtype.is_floating_point else 0
        torch.testing.assert_close(got, want, atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    return out


@pytest.mark.parametrize("shape", PASTE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.uint8])
def test_matches_twin(shape, dtype, channels_last, label_dtype):
    args = paste_inputs(*shape, dtype=dtype, label_dtype=label_dtype, channels_last=channels_last)
    out = check_against_twin(args, lam=0.9)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out[0].is_contiguous(memory_format=fmt) and out[2].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("sel", ["none", "all"])
@pytest.mark.parametrize("lam", [0.0, 1.0, 0.9])
def test_extreme_selections_and_lam(sel, lam):
    args = paste_inputs(3, 3, 17, 33, sel=sel)
    tmpl_img, tmpl_label, _, src_img, src_label, tgt_img, tgt_pseudo = args
    src_mix, src_lbl, tgt_mix, tgt_lbl, mask = check_against_twin(args, lam)
    valid = tmpl_label != 255
    assert torch.equal(mask, valid if sel == "all" else torch.zeros_like(valid))
    if sel == "none" or lam == 0.0:  # nothing is blended in: the destinations come back bit for bit
        assert torch.equal(src_mix, src_img) and torch.equal(tgt_mix, tgt_img)
    if sel == "all" and lam == 1.0:  # every valid pixel is the template's, bit for bit
        assert torch.equal(src_mix[valid[:, None].expand_as(src_mix)], tmpl_img[valid[:, None].expand_as(tmpl_img)])
    assert torch.equal(src_lbl, torch.where(mask, tmpl_label, src_label))
    assert torch.equal(tgt_lbl, torch.where(mask, tmpl_label, tgt_pseudo))


@pytest.mark.parametrize("channels_last", [False, True])
def test_pasted_pixels_join_the_mask_whatever_their_class(channels_last):
    """DSP step 3: pixels the long-tail paste wrote join M even when their class was not chosen; the expectation
    is built pixel by pixel here, independently of both implementations."""
    args = paste_inputs(2, 3, 9, 11, k=5, channels_last=channels_last)
    tmpl_img, tmpl_label, class_sel = args[:3]
    class_sel[:, 2] = False  # the pasted class, not chosen
    tmpl_label[:, 3:6, 4:8] = 2
    pasted = torch.zeros(2, 9, 11, dtype=torch.bool)
    pasted[0, 3:6, 4:8] = True  # image 0 got a crop there; image 1's class-2 pixels are its own, not pasted
    want = torch.zeros(2, 9, 11, dtype=torch.bool)
    for b in range(2):
        for y in range(9):
            for x in range(11):
                lbl = int(tmpl_label[b, y, x])
                want[b, y, x] = bool(pasted[b, y, x]) or (lbl != 255 and bool(class_sel[b, lbl]))
    assert want[0, 3:6, 4:8].all() and not want[1, 3:6, 4:8].any()
    for impl in (lambda *a: sp_mod._dual_soft_paste_triton(*a), twins.dual_soft_paste, kernels.dual_soft_paste):
        src_img, src_lbl, tgt_img, tgt_lbl, mask = impl(*args, 0.9, pasted)
        assert torch.equal(mask, want)
        assert torch.equal(src_lbl, torch.where(want, tmpl_label, args[4]))
        m = want[:, None].float()
        torch.testing.assert_close(src_img, 0.9 * m * tmpl_img + (1 - 0.9 * m) * args[3], atol=1e-6, rtol=0)
        torch.testing.assert_close(tgt_img, 0.9 * m * tmpl_img + (1 - 0.9 * m) * args[5], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="pasted must be"):
        kernels.dual_soft_paste(*args, 0.9, pasted[:1])
    with pytest.raises(ValueError, match="pasted must be a bool"):
        kernels.dual_soft_paste(*args, 0.9, pasted.to(torch.uint8))


def test_ignore_label_everywhere():
    args = list(paste_inputs(3, 3, 17, 33, sel="all"))
    args[1] = torch.full_like(args[1], 255)
    src_mix, _, _, _, mask = check_against_twin(tuple(args), lam=0.9)
    assert not mask.any() and torch.equal(src_mix, args[3])


def test_mixed_label_dtypes_promote_like_torch_where():
    args = list(paste_inputs(2, 3, 17, 33))
    args[1] = args[1].to(torch.uint8)  # template uint8 from the loader, pseudo-labels int64 from argmax
    out = check_against_twin(tuple(args), lam=0.9)
    assert out[1].dtype == torch.int64 and out[3].dtype == torch.int64


def test_strided_labels_and_class_sel():
    args = list(paste_inputs(2, 3, 17, 33))
    args[1] = args[1].transpose(1, 2).contiguous().transpose(1, 2)  # same values, column-major storage
    args[2] = args[2].t().contiguous().t()
    check_against_twin(tuple(args), lam=0.9)


def test_mixed_layouts():
    args = list(paste_inputs(2, 3, 17, 33))
    args[0] = args[0].to(memory_format=torch.channels_last)  # template channels_last, destinations NCHW
    args[5] = torch.rand(2, 3, 17, 40)[..., 3:36]  # a cropped view: no dense layout at all
    out = check_against_twin(tuple(args), lam=0.9)
    assert out[0].is_contiguous() and out[2].shape == args[5].shape


def test_public_function_runs_the_kernel_under_the_interpreter(monkeypatch):
    calls = []
    real = sp_mod._dual_soft_paste_triton
    monkeypatch.setattr(sp_mod, "_dual_soft_paste_triton", lambda *a: calls.append(1) or real(*a))
    kernels.dual_soft_paste(*paste_inputs(1, 3, 5, 7), 0.9)
    assert calls == [1]
    monkeypatch.delenv("TRITON_INTERPRET")  # a CPU tensor without the interpreter goes to the twin
    kernels.dual_soft_paste(*paste_inputs(1, 3, 5, 7), 0.9)
    assert calls == [1]


# ---------------------------------------------------------------------------------------------- bad input
def _with(args: tuple, i: int, value) -> tuple:
    args = list(args)
    args[i] = value
    return tuple(args)


BAD_INPUTS = {
    "image shape": lambda a: _with(a, 3, a[3][:, :, :-1]),
    "image dtype float64": lambda a: _with(a, 0, a[0].double()),
    "images of two dtypes": lambda a: _with(a, 5, a[5].half()),
    "label shape": lambda a: _with(a, 4, a[4][:, :-1]),
    "label dtype int32": lambda a: _with(a, 6, a[6].int()),
    "class_sel not bool": lambda a: _with(a, 2, a[2].int()),
    "class_sel batch": lambda a: _with(a, 2, a[2][:1]),
    "template label = num_classes": lambda a: _with(a, 1, torch.where(a[1] == 0, 19, a[1])),
    "negative source label": lambda a: _with(a, 4, torch.where(a[4] == 0, -1, a[4])),
    "pseudo-label 300": lambda a: _with(a, 6, torch.where(a[6] == 0, 300, a[6])),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
@pytest.mark.parametrize("impl", ["kernel", "twin"])
def test_bad_input_is_a_value_error(case, impl):
    args = BAD_INPUTS[case](paste_inputs(2, 3, 17, 33, k=19))
    fn = kernels.dual_soft_paste if impl == "kernel" else twins.dual_soft_paste
    with pytest.raises(ValueError):
        fn(*args, 0.9)


@pytest.mark.parametrize("lam", [-0.1, 1.5])
def test_lam_out_of_range(lam):
    with pytest.raises(ValueError, match="lam"):
        kernels.dual_soft_paste(*paste_inputs(1, 3, 5, 7), lam)


def test_bad_labels_never_fault_with_checks_off():
    # inside a CUDA graph the value check cannot sync; the kernel must still stay in bounds: a bad class id
    # is simply never selected
    args = _with(paste_inputs(2, 3, 17, 33, k=19, sel="all"), 1, torch.full((2, 17, 33), 200))
    kernels.set_value_checks(False)
    try:
        *_, mask = sp_mod._dual_soft_paste_triton(*args, 0.9)
    finally:
        kernels.set_value_checks(True)
    assert not mask.any()


# ------------------------------------------------------------------------------------------------- GPU only
@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_compiled_kernel_matches_twin(dtype, channels_last):
    for shape in PASTE_GPU_SHAPES:
        args = paste_inputs(*shape, dtype=dtype, channels_last=channels_last, device="cuda")
        check_against_twin(args, lam=0.9)


# ----------------------------------------------------------------------------------------------- packaging
def test_imports_without_triton():
    """A user without the `gpu` extra still imports dsp_fast.kernels and gets the twins."""
    probe = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch\n"
        "from dsp_fast import kernels\n"
        "assert not kernels.HAS_TRITON\n"
        "m = torch.rand(1, 8, 8) < 0.5\n"
        "f = torch.randn(1, 4, 2, 2)\n"
        "print(float(kernels.weighted_mmd(f, f + 1, m, (8, 8))))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_kernels_is_a_leaf():
    """kernels imports torch and triton only: nothing of dsp_fast outside itself (the rule docs/layout.md states)."""
    import ast
    import pathlib

    for path in pathlib.Path(kernels.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not (node.module or "").startswith("dsp_fast"), f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("dsp_fast") for a in node.names), path.name


def test_force_twins_routes_every_call_to_the_twin():
    from dsp_fast.kernels import force_twins
    from dsp_fast.kernels._common import HAS_TRITON, use_triton

    t = torch.zeros(1)
    assert use_triton(t) == HAS_TRITON  # conftest turns the interpreter on
    with force_twins():
        assert not use_triton(t)
        with force_twins(False):  # an inner "off" cannot re-enable the kernels of an outer "on"
            assert not use_triton(t)
    assert use_triton(t) == HAS_TRITON
