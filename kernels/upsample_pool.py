"""Masked pooling of bilinearly upsampled features without building the upsampled tensor.
Twin: `twins.masked_upsample_pool` (F.interpolate, multiply, mean).

Shapes: B batch, C channels, h x w feature map, H x W crop (the upsampling target), n / N a coarse / fine length.

Bilinear upsampling is linear and separable: up[b,c] = Wy feat[b,c] Wx^T with Wy (H, h) and Wx (W, w) holding two
nonzeros per row. Hence
    mean_{y,x} mask[b,y,x] * up[b,c,y,x] = sum_{i,j} feat[b,c,i,j] * A[b,i,j] / (H*W),   A[b] = Wy^T mask[b] Wx,
the mask pushed back through the adjoint of the upsampling: an (h, w) map per image. The Triton kernel below builds
A with two passes of one 1-D adjoint (contract W -> w, then H -> h); the pooling is then a (C, h*w) x (h*w, k)
matrix product per image, and its gradient w.r.t. feat is grad_out (x) A: nothing of size B*C*H*W is ever made.

Why torch.matmul for the pooling and no custom backward: the product reads feat once and writes B*C*k values, and
autograd's backward w.r.t. feat is one matrix product writing the B*C*h*w gradient (both the floor for any kernel),
so a hand-written Triton pair would move the same bytes. The mask gets no gradient (a paste mask).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import twins
from ._common import check_upsample_pool, interpreting, next_pow2, tl, triton, twins_forced, use_triton


@triton.jit
def _adjoint_linear_kernel(x_ptr, out_ptr, P, N, n, sxb, sxp, sxu, sob, sop, soi,
                           scale, half, inv_scale, win, out_mul,
                           BLOCK_P: tl.constexpr, BLOCK_I: tl.constexpr):
    """out[b,p,i] = out_mul * sum_u wgt(u, i) * x[b,p,u]: the adjoint of 1-D linear interpolation from n to N.

    wgt(u, i) is the weight fine sample u gives coarse sample i, computed exactly as PyTorch's upsample_bilinear2d
    does (source index scale*(u+half)-half clamped at 0, floor, lambda). Only the fine samples that can touch the
    block's coarse samples are visited: a window of `win` samples from a conservative start; samples outside the
    true window get weight 0, so the window only has to be a superset."""
    pid_p = tl.program_id(0)
    pid_i = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    p_ok = p < P
    i_ok = i < n
    # fine sample u reaches coarse i only if its source index lies in (i-1, i+1), i.e. u > (i-1+half)/scale - half;
    # one sample of margin below absorbs float32 rounding
    start = tl.floor((i.to(tl.float32) - 1.0 + half) * inv_scale - half).to(tl.int32) - 1
    start = tl.maximum(start, 0)
    acc = tl.zeros([BLOCK_P, BLOCK_I], dtype=tl.float32)
    for du in range(win):
        u = start + du
        u_ok = i_ok & (u < N)
        src = tl.maximum(scale * (u.to(tl.float32) + half) - half, 0.0)
        i0 = tl.minimum(tl.floor(src).to(tl.int32), n - 1)
        lam1 = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
        i1 = tl.where(i0 < n - 1, i0 + 1, i0)
        wgt = tl.where(i0 == i, 1.0 - lam1, 0.0) + tl.where(i1 == i, lam1, 0.0)
        xv = tl.load(x_ptr + b * sxb + p[:, None] * sxp + u[None, :] * sxu,
                     mask=p_ok[:, None] & u_ok[None, :], other=0.0).to(tl.float32)
        acc += xv * wgt[None, :]
    acc = acc * out_mul
    tl.store(out_ptr + b * sob + p[:, None] * sop + i[None, :] * soi, acc.to(out_ptr.dtype.element_ty),
             mask=p_ok[:, None] & i_ok[None, :])


def _interp_params(fine: int, coarse: int, align_corners: bool) -> tuple[float, float, float, int]:
    """(scale, half, inv_scale, window) of the 1-D map coarse -> fine, with PyTorch's scale formula
    (size given, no scale_factor)."""
    if align_corners:
        scale = (coarse - 1) / (fine - 1) if fine > 1 else 0.0
        half = 0.0
    else:
        scale, half = coarse / fine, 0.5
    if scale == 0.0:  # every fine sample reads coarse sample 0: visit them all
        return 0.0, half, 0.0, fine
    inv = 1.0 / scale
    # a coarse sample is reached by fine samples in an open interval of length 2*inv; +3 covers the floor in
    # `start`, its one-sample margin and rounding
    return scale, half, inv, min(int(math.floor(2.0 * inv)) + 3, fine + 2)


def _adjoint_linear(x_BPN: torch.Tensor, out_BPn: torch.Tensor, align_corners: bool, out_mul: float) -> None:
    """Write into out_BPn the adjoint of linear interpolation along the last axis of x_BPN (any strides)."""
    n_b, n_p, n_fine = x_BPN.shape
    n_coarse = out_BPn.shape[2]
    scale, half, inv, win = _interp_params(n_fine, n_coarse, align_corners)
    if interpreting():  # ~1 ms per program there: one or a few programs per image
        block_p, block_i = min(next_pow2(n_p), 1024), min(next_pow2(n_coarse), 128)
    else:
        block_p, block_i = 32, 32
    grid = (triton.cdiv(n_p, block_p), triton.cdiv(n_coarse, block_i), n_b)
    _adjoint_linear_kernel[grid](x_BPN, out_BPn, n_p, n_fine, n_coarse, *x_BPN.stride(), *out_BPn.stride(),
                                 scale, half, inv, win, out_mul, BLOCK_P=block_p, BLOCK_I=block_i)


def adjoint_map(mask: torch.Tensor | None, feat_hw: tuple[int, int], size: tuple[int, int], align_corners: bool,
                dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A / (H*W): the mask pushed back through the adjoint of bilinear upsampling (h, w) -> size, as (B', h, w)
    in `dtype` (B' = 1 when mask is None: the same map serves every image)."""
    big_h, big_w = size
    if mask is None:
        # all ones through stride-0 broadcasting: no (B, H, W) tensor is materialised
        mask_BHW = torch.ones((1, 1, 1), dtype=torch.float32, device=device).expand(1, big_h, big_w)
    else:
        mask_BHW = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    if not use_triton(mask_BHW):
        return _adjoint_map_torch(mask_BHW, feat_hw[0], feat_hw[1], align_corners, dtype)
    return torch.ops.dsp_fast.adjoint_map(mask_BHW, feat_hw[0], feat_hw[1], align_corners, dtype)


def interpolation_matrix(fine: int, coarse: int, align_corners: bool, device: torch.device) -> torch.Tensor:
    """R (fine, coarse): 1-D linear interpolation coarse -> fine as a matrix, fine = R @ coarse, with PyTorch's own
    weights (F.interpolate of the identity: each column is the interpolation of one unit vector)."""
    eye = torch.eye(coarse, dtype=torch.float32, device=device)[None]  # (1, coarse channels, coarse samples)
    return F.interpolate(eye, size=fine, mode="linear", align_corners=align_corners)[0].T


def upsample_bilinear(x: torch.Tensor, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    """F.interpolate(x, size, 'bilinear', align_corners) of (N, C, h, w); twin: `twins.upsample_bilinear`.

    On CPU in fp32 as two matrix products, up = Ry x Rx^T with the interpolation matrices above: aten's CPU
    backward of the bilinear upsample scatters into the input gradient one output pixel at a time, while the
    products' backward is two more products (6 x 19 x 16 x 16 logits to 128 x 128, forward and backward: 2.97 ms
    against 7.07 on the 2-core CPU VM; bench/bench_kernels.py, rows in bench/results/kernels_cpu.csv). The values
    agree with aten's to rounding (each output sums the same four weighted inputs, rows then columns). On CUDA, in
    half precision or under autocast (where the products would round the weights to the autocast type), and
    inside `force_twins()`, F.interpolate."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu") or twins_forced()
            or x.dim() != 4):
        return twins.upsample_bilinear(x, size, align_corners)
    ry_Hh = interpolation_matrix(size[0], x.shape[-2], align_corners, x.device)
    rx_Ww = interpolation_matrix(size[1], x.shape[-1], align_corners, x.device)
    return torch.matmul(torch.matmul(ry_Hh, x), rx_Ww.T)


def _adjoint_map_torch(mask_BHW: torch.Tensor, h: int, w: int, align_corners: bool, dtype: torch.dtype
                       ) -> torch.Tensor:
    """The same A / (H*W) in plain PyTorch, where the Triton kernel does not run (CPU, or no triton): bilinear
    upsampling is separable, up = Ry feat Rx^T, so A = Ry^T M Rx with two small interpolation matrices (H x h and
    W x w). Two matrix products per image; the largest tensor is the (B, h, W) half-product."""
    n_b, big_h, big_w = mask_BHW.shape
    ry_Hh = interpolation_matrix(big_h, h, align_corners, mask_BHW.device)
    rx_Ww = interpolation_matrix(big_w, w, align_corners, mask_BHW.device)
    rows_BhW = torch.matmul(ry_Hh.T, mask_BHW.float())  # contract H -> h (a stride-0 mask broadcasts)
    a_Bhw = torch.matmul(rows_BhW, rx_Ww) / (big_h * big_w)
    return a_Bhw.to(dtype)


# The two launches as one torch operator, so that fake tensors, torch.compile and op recordings see one node.
# A has no gradient (the mask is data), so the operator needs no autograd formula: the pooling that uses A is a
# plain matmul, differentiated by autograd.
@torch.library.custom_op("dsp_fast::adjoint_map", mutates_args=())
def _adjoint_map_op(mask_BHW: torch.Tensor, h: int, w: int, align_corners: bool, dtype: torch.dtype
                    ) -> torch.Tensor:
    n_b, big_h, big_w = mask_BHW.shape
    device = mask_BHW.device
    rows_BHw = torch.empty((n_b, big_h, w), dtype=torch.float32, device=device)
    _adjoint_linear(mask_BHW, rows_BHw, align_corners, 1.0)  # contract W -> w
    # the 1/(H*W) of the mean is folded in here, so that a half-precision A stays in range (entries ~1/(h*w))
    a_Bhw = torch.empty((n_b, h, w), dtype=dtype, device=device)
    _adjoint_linear(rows_BHw.transpose(1, 2), a_Bhw.transpose(1, 2), align_corners, 1.0 / (big_h * big_w))
    return a_Bhw


@_adjoint_map_op.register_fake
def _(mask_BHW, h, w, align_corners, dtype):
    return mask_BHW.new_empty((mask_BHW.shape[0], h, w), dtype=dtype)


def pool_with_maps(feat_BChw: torch.Tensor, a_BKhw: torch.Tensor) -> torch.Tensor:
    """(B, C, K) = feat (B, C, h*w) x A^T (B, h*w, K). flatten(2) is a view for NCHW and channels_last alike, and
    the batched product takes either layout without a copy."""
    return torch.matmul(feat_BChw.flatten(2), a_BKhw.flatten(2).transpose(1, 2))


def _masked_upsample_pool_adjoint(feat: torch.Tensor, mask: torch.Tensor | None, size: tuple[int, int],
                                 align_corners: bool = True) -> torch.Tensor:
    a_Bhw = adjoint_map(mask, tuple(feat.shape[-2:]), size, align_corners, feat.dtype, feat.device)
    return pool_with_maps(feat, a_Bhw[:, None].expand(feat.shape[0], 1, -1, -1))[..., 0]


def masked_upsample_pool(feat: torch.Tensor, mask: torch.Tensor | None, size: tuple[int, int],
                         align_corners: bool = True) -> torch.Tensor:
    """(B, C): mean over the size[0]*size[1] pixels of mask * bilinear_upsample(feat, size); mask=None is all ones.

    feat (B, C, h, w) float32/float16/bfloat16, NCHW or channels_last; mask (B, H, W) bool or float, no gradient.
    Differentiable w.r.t. feat."""
    size = check_upsample_pool(feat, mask, size)
    if twins_forced():
        return twins.masked_upsample_pool(feat, mask, size, align_corners)
    return _masked_upsample_pool_adjoint(feat, mask, size, align_corners)
