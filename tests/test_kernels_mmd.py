"""masked_upsample_pool, mmd_rbf and weighted_mmd against their twins (upsample, multiply, mean, textbook MMD).

Shapes: B batch, C channels, h x w features, H x W crop; inputs and shapes from bench/kernel_cases.py (shared with
the microbenchmarks and the memory runs). The adjoint map A is built by the Triton kernel (the
interpreter on CPU, compiled on a GPU) or, where Triton does not run, by two interpolation matrices in plain PyTorch:
both are tested. Tolerances, relative to the largest magnitude of the reference:
- float32 pools and their gradients: 1e-5. Both sides sum the same H*W products in different orders and with float32
  interpolation weights; the observed gap is ~1e-7, accumulation error grows like sqrt(H*W) * 6e-8 ~ 3e-5 at worst
  for 512x512.
- float16 pools: atol 1e-3 on values <= 0.5. The twin rounds every upsampled pixel and every product to half
  (2**-11 relative each) before a float32 mean; the kernel path rounds A to half (entries ~1/(h*w), normal range)
  and the output once: a few half ulps at 0.5 (2.4e-4 each).
- MMD values and gradients (float32 math on both sides): rtol 1e-4 of the reference's largest magnitude, for the
  exp(-d2/bw) of distances that themselves carry the pooling's relative error.
- bfloat16 (GPU only): 2e-2 relative, the float16 argument with bf16's 2**-8.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from bench.kernel_cases import ADJOINT_SIZES, MMD_ROWS, PAPER_FEATURES, POOL_SHAPES, feature_inputs, make_mask
from dsp_fast import kernels

mmd_mod = kernels.mmd
twins = kernels.twins
up_mod = kernels.upsample_pool

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (bf16 / compiled kernels)")


def close(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    """assert_close with a tolerance relative to the reference's scale; prints the first worst index on failure."""
    scale = want.detach().float().abs().max().clamp_min(1e-12).item()
    torch.testing.assert_close(got.detach().float(), want.detach().float(), atol=rel * scale, rtol=0,
                               msg=lambda m: f"{what}: {m}")


def interp_matrix(n: int, big_n: int, align_corners: bool) -> torch.Tensor:
    """(big_n, n) float64 matrix of 1-D bilinear upsampling, read off F.interpolate applied to the unit vectors."""
    eye = torch.eye(n, dtype=torch.float64)[None, :, :, None]
    return F.interpolate(eye, size=(big_n, 1), mode="bilinear", align_corners=align_corners)[0, :, :, 0].T


@pytest.fixture(params=["triton", "torch"])
def adjoint_path(request, monkeypatch) -> str:
    """The adjoint map built by the Triton kernel (the interpreter here) or by two interpolation matrices in plain
    PyTorch (what runs where Triton does not: CPU without the interpreter, or no triton)."""
    if request.param == "torch":
        monkeypatch.setattr(up_mod, "use_triton", lambda t: False)
    return request.param


# ------------------------------------------------------------------------------------------- the adjoint map
@pytest.mark.parametrize("sizes", ADJOINT_SIZES)
@pytest.mark.parametrize("align_corners", [True, False])
def test_adjoint_map_is_the_adjoint_of_f_interpolate(sizes, align_corners, adjoint_path):
    """A = Wy^T mask Wx / (H*W), with Wy, Wx read off F.interpolate: checks the kernel's index and weight math
    (including the fine-sample windows) independently of any pooling. float64 reference; rel 1e-5 as above."""
    (h, w), (big_h, big_w) = sizes
    mask = torch.rand(2, big_h, big_w) < 0.5
    got = up_mod.adjoint_map(mask, (h, w), (big_h, big_w), align_corners, torch.float32, mask.device)
    wy, wx = interp_matrix(h, big_h, align_corners), interp_matrix(w, big_w, align_corners)
    want = torch.einsum("yi,byx,xj->bij", wy, mask.double(), wx) / (big_h * big_w)
    close(got, want, 1e-5, "A")


# ------------------------------------------------------------------------------------ masked_upsample_pool
def pool_case(shape, size, mask_kind, dtype, channels_last, align_corners):
    feat = torch.randn(shape).to(dtype)
    if channels_last:
        feat = feat.to(memory_format=torch.channels_last)
    mask = make_mask(mask_kind, shape[0], *size)
    grad_out = torch.randn(shape[:2]).to(dtype)
    results = []
    for fn in (up_mod._masked_upsample_pool_adjoint, twins.masked_upsample_pool):
        f = feat.detach().clone().requires_grad_()
        out = fn(f, mask, size, align_corners)
        out.backward(grad_out)
        results.append((out, f.grad))
    return results


@pytest.mark.parametrize("shape,size", POOL_SHAPES)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("align_corners", [True, False])
def test_pool_matches_twin(shape, size, mask_kind, dtype, channels_last, align_corners, adjoint_path):
    (out, grad), (ref_out, ref_grad) = pool_case(shape, size, mask_kind, dtype, channels_last, align_corners)
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    rel = 1e-5 if dtype == torch.float32 else 2e-3
    close(out, ref_out, rel, "pool")
    close(grad, ref_grad, rel, "d pool / d feat")


@pytest.mark.parametrize("mask_kind", ["all_false", "all_true"])
def test_pool_extreme_masks(mask_kind, adjoint_path):
    (out, grad), (ref_out, ref_grad) = pool_case((2, 3, 4, 6), (17, 33), mask_kind, torch.float32, False, True)
    close(out, ref_out, 1e-5, "pool")
    close(grad, ref_grad, 1e-5, "d pool / d feat")
    if mask_kind == "all_false":
        assert not out.any() and not grad.any()


# --------------------------------------------------------------------------------------------------- mmd_rbf
@pytest.mark.parametrize("rows", MMD_ROWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kernels_", [(2.0, 5), (3.0, 1), (1.5, 4)])
def test_mmd_rbf_matches_twin(rows, dtype, kernels_):
    x, y = torch.randn(rows[0], 256).to(dtype), (torch.randn(rows[1], 256) + 0.2).to(dtype)
    got, want = [], []
    for fn, store in ((kernels.mmd_rbf, got), (twins.mmd_rbf, want)):
        xx, yy = x.clone().requires_grad_(), y.clone().requires_grad_()
        val = fn(xx, yy, *kernels_)
        val.backward()
        store.extend([val, xx.grad, yy.grad])
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    # float16 inputs get float16 gradients: two float32 values 1e-7 apart can round to neighbouring halves,
    # 2**-11 relative of the element, hence 1e-3 of the largest there
    grad_rel = 1e-4 if dtype == torch.float32 else 1e-3
    for g, w, what, rel in zip(got, want, ("mmd", "d/dx", "d/dy"), (1e-4, grad_rel, grad_rel)):
        close(g, w, rel, what)


def test_mmd_rbf_identical_rows_is_zero_not_nan():
    x = torch.ones(2, 8, requires_grad=True)
    for fn in (kernels.mmd_rbf, twins.mmd_rbf):
        val = fn(x, x.detach().clone())
        (grad,) = torch.autograd.grad(val, x)
        assert val.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


# ---------------------------------------------------------------------------------------------- weighted_mmd
def wmmd_case(b, c, hw, size, mask_kind, dtype, channels_last):
    feat_s, feat_t, mask = feature_inputs(b, c, hw, size, dtype, mask=mask_kind, target_scale=1.5, target_shift=0.3,
                                          channels_last=channels_last)
    results = []
    for fn in (mmd_mod._weighted_mmd_fused, twins.weighted_mmd):
        s, t = feat_s.detach().clone().requires_grad_(), feat_t.detach().clone().requires_grad_()
        val = fn(s, t, mask, size, 2.0, 5)
        val.backward()
        results.append((val, s.grad, t.grad))
    return results


@pytest.mark.parametrize("b", [1, 2, 3])
@pytest.mark.parametrize("mask_kind", ["bool", "float", "all_false", "all_true"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_weighted_mmd_matches_twin(b, mask_kind, channels_last):
    got, want = wmmd_case(b, 16, (3, 5), (17, 33), mask_kind, torch.float32, channels_last)
    for g, w, what in zip(got, want, ("wmmd", "d/dfeat_s", "d/dfeat_t")):
        assert torch.isfinite(g).all(), what
        close(g, w, 1e-4, what)


def textbook_mmd(x: torch.Tensor, y: torch.Tensor) -> float:
    """The authors' mmd_rbf written out in float64 with loops: 5 bandwidths beta * 2**(j-2), beta the mean
    off-diagonal squared distance."""
    z = torch.cat([x, y]).double()
    n = len(z)
    d2 = [[float(((z[i] - z[j]) ** 2).sum()) for j in range(n)] for i in range(n)]
    beta = sum(d2[i][j] for i in range(n) for j in range(n) if i != j) / (n * n - n)
    k = [[sum(math.exp(-d2[i][j] / (beta * 2 ** (e - 2))) for e in range(5)) for j in range(n)] for i in range(n)]
    nx = len(x)
    sign = [1.0 / nx] * nx + [-1.0 / (n - nx)] * (n - nx)
    return sum(sign[i] * sign[j] * k[i][j] for i in range(n) for j in range(n))


@pytest.mark.parametrize("impl", ["fused", "twin"])
def test_weighted_mmd_global_term_pools_the_stride8_map(impl):
    """With an all-false mask the masked term is 0 (all pooled vectors equal), so the value is the global term:
    the MMD of the plain means of the stride-8 maps (the authors' AdaptiveAvgPool2d before upsampling), not of the
    upsampled maps' means (align_corners=True weights border cells less: a different value)."""
    gen = torch.Generator().manual_seed(0)
    feat_s, feat_t = torch.randn(2, 4, 3, 5, generator=gen), torch.randn(2, 4, 3, 5, generator=gen) + 0.5
    mask = torch.zeros(2, 17, 33, dtype=torch.bool)
    fn = mmd_mod._weighted_mmd_fused if impl == "fused" else twins.weighted_mmd
    got = float(fn(feat_s, feat_t, mask, (17, 33), 2.0, 5))
    want = textbook_mmd(feat_s.mean((2, 3)), feat_t.mean((2, 3)))
    up = [F.interpolate(f, size=(17, 33), mode="bilinear", align_corners=True).mean((2, 3)) for f in (feat_s, feat_t)]
    assert got == pytest.approx(want, rel=1e-5)
    assert abs(textbook_mmd(*up) - want) > 1e-3  # the test can tell the two formulations apart


def test_weighted_mmd_float16_features():
    got, want = wmmd_case(2, 16, (3, 5), (17, 33), "bool", torch.float16, False)
    # float16 pools differ by ~1e-3 relative (see the header); the MMD passes that on, gradients too
    for g, w, what in zip(got, want, ("wmmd", "d/dfeat_s", "d/dfeat_t")):
        close(g, w, 2e-2, what)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any ATen op returns (forward and backward alike)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_weighted_mmd_never_builds_the_upsampled_tensor():
    """The fused formulation's largest tensor, forward + backward, is far below B*C*H*W (the twin builds several)."""
    b, c, hw, size = 2, 32, (9, 9), (65, 65)
    feat_s = torch.randn(b, c, *hw, requires_grad=True)
    feat_t = torch.randn(b, c, *hw, requires_grad=True)
    mask = torch.rand(b, *size) < 0.5
    largest = {}
    for name, fn in (("fused", kernels.weighted_mmd), ("twin", twins.weighted_mmd)):
        with _LargestTensor() as probe:
            fn(feat_s, feat_t, mask, size).backward()
        largest[name] = probe.largest
    full = b * c * size[0] * size[1]
    assert largest["twin"] >= full
    assert largest["fused"] <= b * size[0] * size[1], largest  # mask-sized (B*H*W) at most


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("impl", ["kernel", "twin"])
def test_pool_bad_input(impl):
    fn = kernels.masked_upsample_pool if impl == "kernel" else twins.masked_upsample_pool
    feat = torch.randn(2, 4, 5, 6)
    with pytest.raises(ValueError, match="smaller than the feature map"):
        fn(feat, None, (4, 12))
    with pytest.raises(ValueError, match="mask"):
        fn(feat, torch.ones(2, 16, 17, dtype=torch.bool), (16, 16))
    with pytest.raises(ValueError, match="mask"):
        fn(feat, torch.ones(2, 16, 16, dtype=torch.int64), (16, 16))
    with pytest.raises(ValueError, match="feat"):
        fn(feat[0], None, (16, 16))
    with pytest.raises(ValueError, match="feat"):
        fn(feat.double(), None, (16, 16))
    with pytest.raises(ValueError, match="size"):
        fn(feat, None, (16,))
    with pytest.raises(ValueError, match="grad"):
        fn(feat, torch.rand(2, 16, 16, requires_grad=True), (16, 16))


@pytest.mark.parametrize("impl", ["kernel", "twin"])
def test_mmd_bad_input(impl):
    mmd = kernels.mmd_rbf if impl == "kernel" else twins.mmd_rbf
    wmmd = kernels.weighted_mmd if impl == "kernel" else twins.weighted_mmd
    with pytest.raises(ValueError):
        mmd(torch.randn(2, 8), torch.randn(2, 9))
    with pytest.raises(ValueError):
        mmd(torch.randn(2, 8), torch.randn(2, 8).double())
    with pytest.raises(ValueError):
        mmd(torch.randn(2, 8), torch.randn(2, 8), kernel_num=0)
    feat = torch.randn(2, 4, 5, 6)
    with pytest.raises(ValueError):
        wmmd(feat, feat[:, :3], torch.ones(2, 16, 16, dtype=torch.bool), (16, 16))
    with pytest.raises(ValueError):
        wmmd(feat, feat, torch.ones(2, 16, 16, dtype=torch.bool), (4, 4))
    with pytest.raises(ValueError):
        wmmd(feat, feat, torch.ones(1, 16, 16, dtype=torch.bool), (16, 16))


# ------------------------------------------------------------------------------------------------- GPU only
@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_compiled_matches_twin_at_paper_shapes(dtype, channels_last):
    """Compiled kernels at B=2, 256x65x65 -> 512x512. The twin runs in float32 on the same (rounded) inputs, so the
    gap is the low-precision path's own error."""
    rel = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    size = PAPER_FEATURES[3]
    feat_s, feat_t, mask = feature_inputs(*PAPER_FEATURES, dtype, device="cuda", density=0.5,
                                          channels_last=channels_last)
    for align_corners in (True, False):
        got = kernels.masked_upsample_pool(feat_s, mask, size, align_corners)
        want = twins.masked_upsample_pool(feat_s.float(), mask, size, align_corners)
        close(got, want, rel, f"pool align_corners={align_corners}")
    got, want = [], []
    impls = ((kernels.weighted_mmd, got, lambda t: t), (twins.weighted_mmd, want, torch.Tensor.float))
    for fn, store, cast in impls:
        s, t = feat_s.detach().clone().requires_grad_(), feat_t.detach().clone().requires_grad_()
        val = fn(cast(s), cast(t), mask, size)
        val.backward()
        store.extend([val, s.grad, t.grad])
    for g, w, what in zip(got, want, ("wmmd", "d/dfeat_s", "d/dfeat_t")):
        close(g, w, max(rel * 10, 1e-4), what)
