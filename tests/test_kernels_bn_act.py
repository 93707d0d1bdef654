"""bn_act (batch norm + residual add + ReLU): the Triton kernels (interpreter on CPU, compiled on a GPU) against
their twin, which is F.batch_norm per group (nn.BatchNorm2d's own function), the add and F.relu in eager torch.

Shapes: N images, C channels, H x W; cases from bench/kernel_cases.py (odd channel counts, 1x1 maps, per-group
statistics). Tolerances:
- float32: forward atol/rtol 1e-5; gradients rtol 1e-4, atol 1e-5. The kernels sum per tile then combine (Chan's
  formula for the variance), torch sums in its own order: the statistics differ in the last few ulps (~1e-7
  relative), and the weight / bias gradients are sums of up to 4000 products, each ordering error ~1e-7 relative.
- float16: the kernels load fp16, compute in fp32 and round once: compared with the fp32 twin on the same fp16
  values (rounded to fp16 after), they differ by at most one fp16 rounding, 2**-11 relative, plus the fp32 error
  above: rtol 1e-3, atol 1e-3 (values near 0). Weight and bias gradients stay fp32 in both: the fp32 tolerances.
- running statistics: atol 1e-6, lerp_ against F.batch_norm's (1 - m) * r + m * mean of values ~1.
bf16 only on a GPU (the interpreter computes bf16 wrongly).
"""

from __future__ import annotations

import pytest
import torch

from bench.kernel_cases import BN_SHAPES, BN_VARIANTS, bn_inputs
from dsp_fast import kernels

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (bf16 / compiled kernels)")
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.float16: {"atol": 1e-3, "rtol": 1e-3},
       torch.bfloat16: {"atol": 2e-2, "rtol": 1.6e-2}}
GRAD_TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-4}, torch.float16: {"atol": 1e-3, "rtol": 1e-3},
            torch.bfloat16: {"atol": 2e-2, "rtol": 1.6e-2}}


def run(fn, inp: dict, training: bool, group_size: int, relu: bool, upcast: bool = False) -> dict:
    """One forward and backward of fn on fresh copies of inp; returns the output, the gradients, the running
    statistics. upcast: fp32 copies of the tensors (the fp32 twin beside a low-precision kernel)."""
    def leaf(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        t = t.detach().clone().float() if upcast else t.detach().clone()
        return t.requires_grad_()

    x, w, b, res = (leaf(inp[k]) for k in ("x", "weight", "bias", "residual"))
    rm, rv = inp["running_mean"].clone(), inp["running_var"].clone()
    y = fn(x, w, b, rm, rv, training, 0.1, 1e-5, group_size, res, relu)
    dy = torch.sin(torch.arange(y.numel(), dtype=torch.float32)).view(y.shape).to(y.device, inp["x"].dtype)
    dy = dy.to(y.dtype)
    y.backward(dy)
    out = {"y": y, "dx": x.grad, "dweight": w.grad, "dbias": b.grad, "running_mean": rm, "running_var": rv}
    if res is not None:
        out["dresidual"] = res.grad
    return out


def assert_matches(got: dict, want: dict, dtype: torch.dtype) -> None:
    for name, g in got.items():
        w = want[name]
        if name in ("running_mean", "running_var"):
            tol = {"atol": 1e-6, "rtol": 0}
        elif name in ("dweight", "dbias"):
            tol = GRAD_TOL[torch.float32]
        else:
            tol = (TOL if name == "y" else GRAD_TOL)[dtype]
            w = w.to(dtype)
        torch.testing.assert_close(g, w, **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("residual,relu", BN_VARIANTS)
def test_matches_twin(shape, dtype, channels_last, residual, relu):
    n, c, h, w, group_size = shape
    inp = bn_inputs(n, c, h, w, dtype=dtype, channels_last=channels_last, residual=residual)
    got = run(kernels.bn_act, inp, True, group_size, relu)
    want = run(kernels.twins.bn_act, inp, True, group_size, relu, upcast=dtype != torch.float32)
    assert_matches(got, want, dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert got["y"].is_contiguous(memory_format=fmt) and got["dx"].is_contiguous(memory_format=fmt)
    assert got["y"].dtype == dtype


def test_the_kernels_ran():
    """Under the interpreter a CPU tensor takes the kernels' operators (the comparison above is not twin vs twin)."""
    from helpers_capture import OpRecorder

    inp = bn_inputs(3, 17, 5, 7)
    with OpRecorder() as rec:
        run(kernels.bn_act, inp, True, 1, True)
    names = {op for op, _ in rec.ops}
    assert {"dsp_fast::bn_stats", "dsp_fast::bn_act_fwd", "dsp_fast::bn_act_bwd_reduce",
            "dsp_fast::bn_act_bwd_dx"} <= names


@pytest.mark.parametrize("channels_last", [False, True])
def test_residual_in_another_layout(channels_last):
    """The residual's strides are read, not assumed to be x's (a downsample branch may differ)."""
    inp = bn_inputs(3, 17, 5, 7, channels_last=channels_last)
    fmt = torch.contiguous_format if channels_last else torch.channels_last
    inp["residual"] = inp["residual"].contiguous(memory_format=fmt)
    assert_matches(run(kernels.bn_act, inp, True, 0, True), run(kernels.twins.bn_act, inp, True, 0, True),
                   torch.float32)


@pytest.mark.parametrize("group_size", [0, 1])
def test_running_statistics_mode(group_size):
    """Eval mode (or DeepLab's frozen BN): the running statistics normalise, are left unchanged, and get no
    gradient path; groups do not matter there."""
    inp = bn_inputs(3, 17, 5, 7)
    got = run(kernels.bn_act, inp, False, group_size, True)
    assert_matches(got, run(kernels.twins.bn_act, inp, False, group_size, True), torch.float32)
    assert torch.equal(got["running_mean"], inp["running_mean"])


def test_no_affine_no_running_statistics():
    """affine=False, track_running_stats=False: batch statistics in both modes, as nn.BatchNorm2d."""
    inp = bn_inputs(3, 17, 5, 7)
    for training in (True, False):
        x = inp["x"].clone().requires_grad_()
        y = kernels.bn_act(x, None, None, None, None, training, residual=inp["residual"])
        y.sum().backward()
        x2 = inp["x"].clone().requires_grad_()
        y2 = torch.relu(torch.nn.functional.batch_norm(x2, None, None, training=True) + inp["residual"])
        y2.sum().backward()
        torch.testing.assert_close(y, y2, **TOL[torch.float32])
        torch.testing.assert_close(x.grad, x2.grad, **GRAD_TOL[torch.float32])


def test_matches_eager_per_group_module():
    """Against the modules the fast path used before: a per-group BatchNorm2d then ReLU (values, gradients, running
    statistics after two calls)."""
    from dsp_fast.engine.batchnorm import PerGroupBatchNorm2d

    bn = PerGroupBatchNorm2d(17)
    bn.group_size = 1
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    for _ in range(2):
        inp = bn_inputs(3, 17, 5, 7, residual=False)
        x1, x2 = inp["x"].clone().requires_grad_(), inp["x"].clone().requires_grad_()
        y1 = torch.relu(bn(x1))
        y2 = kernels.bn_act(x2, bn.weight, bn.bias, rm, rv, True, bn.momentum, bn.eps, 1)
        dy = torch.randn_like(y1)
        y1.backward(dy)
        y2.backward(dy)
        torch.testing.assert_close(y2, y1, **TOL[torch.float32])
        torch.testing.assert_close(x2.grad, x1.grad, **GRAD_TOL[torch.float32])
    torch.testing.assert_close(rm, bn.running_mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(rv, bn.running_var, atol=1e-6, rtol=0)


@pytest.mark.parametrize("momentum", [0.1, 0.7])
@pytest.mark.parametrize("channels_last", [False, True])
def test_finalize_combines_many_partial_rows(monkeypatch, momentum, channels_last):
    """Small tiles, as on a GPU (the interpreter's defaults make one partial row per image): 99 pixels in tiles of
    16, two tiles per partial row (the last row: one tile of 3 pixels, one empty), give 4 partial rows per image, 12
    per group of 3, read 8 at a time (the second step partial), 5 channels in blocks of 4; the running statistics
    with a momentum on either side of torch's lerp_ switch (0.5)."""
    from dsp_fast.kernels import norm_act

    monkeypatch.setattr(norm_act, "_blocks", lambda n_pix, n_c: (16, 4))
    monkeypatch.setattr(norm_act, "_reduce_tiles", lambda: 2)
    monkeypatch.setattr(norm_act, "_finalize_blocks", lambda rows, n_c: (8, 4))
    inp = bn_inputs(6, 5, 9, 11, channels_last=channels_last)

    def twin_with(m):
        return lambda *a: kernels.twins.bn_act(*a[:6], m, *a[7:])

    def kernel_with(m):
        return lambda *a: kernels.bn_act(*a[:6], m, *a[7:])

    got = run(kernel_with(momentum), inp, True, 3, True)
    want = run(twin_with(momentum), inp, True, 3, True)
    assert_matches(got, want, torch.float32)
    assert not torch.equal(got["running_mean"], inp["running_mean"])


def test_rejects_bad_inputs():
    inp = bn_inputs(3, 17, 5, 7)
    with pytest.raises(ValueError, match="residual has shape"):
        kernels.bn_act(inp["x"], None, None, None, None, True, residual=inp["residual"][:, :5])
    with pytest.raises(ValueError, match="weight must be"):
        kernels.bn_act(inp["x"], torch.ones(3), None, None, None, True)
    with pytest.raises(ValueError, match="does not split into groups of 2"):
        kernels.bn_act(inp["x"], None, None, None, None, True, group_size=2)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_matches_twin_on_gpu(dtype, channels_last):
    n, c, h, w, group_size = (6, 256, 65, 65, 2)
    inp = {k: (v.cuda() if v is not None else None)
           for k, v in bn_inputs(n, c, h, w, dtype=dtype, channels_last=channels_last).items()}
    got = run(kernels.bn_act, inp, True, group_size, True)
    want = run(kernels.twins.bn_act, inp, True, group_size, True, upcast=True)
    assert_matches(got, want, dtype)
