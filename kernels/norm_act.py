"""Batch norm (training statistics per group of images, or running statistics) + optional residual add + optional
ReLU, forward and backward, each as one elementwise pass. Twin: `twins.bn_act`.

Shapes: N images of C channels, H x W pixels, P = H*W; images split into G groups of GS = N / G images, each with
its own statistics (the batched student's per-group BN); `_GC` tensors hold one fp32 value per group and channel.

Passes over HBM (x, residual, y, dy, dx the size of x):
  forward   statistics: read x                      elementwise: read x (+ residual), write y
  backward  reductions: read dy, y, x (write dy')   elementwise: read dy', x, write dx
where dy' = dy * (y > 0) is also the residual's gradient (no pass of its own). Eager torch makes a pass per
operator (BN's two, ReLU's, the add's, and their backwards). Statistics are per-block partial means and squared
deviations combined in fp32 (Chan's formula): no cancellation of sum(x^2) - sum(x)^2, no atomics (deterministic).
Layout: any strides (NCHW and channels_last), no copy; offsets inside one image in int32, the image offset in int64.
"""

from __future__ import annotations

import torch

from . import twins
from ._common import check_bn_act, interpreting, next_pow2, tl, triton, use_triton

# pixels x channels per program: 32 x 32 on 4 warps compiles without register spills on sm_80/sm_90 (python -m
# bench.compile_kernels; 64 x 64 spilled in the fp16 backward on either warp count). The partial sums this leaves,
# 2 fp32 values per 32 pixels and channel, are 1/8 of a bf16 x. The interpreter pays ~1 ms per program: big tiles.
_BLOCK_P, _BLOCK_C, _WARPS = 32, 32, 4


def _blocks(n_pix: int, n_c: int) -> tuple[int, int]:
    if interpreting():
        return min(next_pow2(n_pix), 4096), min(next_pow2(n_c), 64)
    return _BLOCK_P, _BLOCK_C


@triton.jit
def _tile(p_blk, c_blk, W, P, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pixel (row, column) and channel indices of a tile, and its in-bounds mask."""
    p = p_blk * BLOCK_P + tl.arange(0, BLOCK_P)
    c = c_blk * BLOCK_C + tl.arange(0, BLOCK_C)
    return (p // W)[:, None], (p % W)[:, None], c[None, :], (p < P)[:, None] & (c < C)[None, :]


@triton.jit
def _stats_kernel(x, pmean, pm2, C, W, P, sx_n, sx_c, sx_h, sx_w,
                  BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # grid (pixel blocks, channel blocks, N): the tile's per-channel mean and sum of squared deviations
    p_blk, c_blk, n = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    h, w, c, ok = _tile(p_blk, c_blk, W, P, C, BLOCK_P, BLOCK_C)
    v = tl.load(x + n * sx_n + h * sx_h + w * sx_w + c * sx_c, mask=ok, other=0.0).to(tl.float32)
    cnt = tl.maximum(tl.sum(ok.to(tl.float32), axis=0), 1.0)  # channels past C: 0 pixels, never stored
    mean = tl.sum(v, axis=0) / cnt
    d = tl.where(ok, v - mean[None, :], 0.0)
    out = (n * tl.num_programs(0) + p_blk) * C + c_blk * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c_blk * BLOCK_C + tl.arange(0, BLOCK_C) < C
    tl.store(pmean + out, mean, mask=cm)
    tl.store(pm2 + out, tl.sum(d * d, axis=0), mask=cm)


@triton.jit
def _fwd_kernel(x, res, y, mean, scale, shift, C, W, P, GS,
                sx_n, sx_c, sx_h, sx_w, sr_n, sr_c, sr_h, sr_w, sy_n, sy_c, sy_h, sy_w,
                HAS_RES: tl.constexpr, RELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # y = relu((x - mean) * scale + shift + residual), mean/scale/shift of the image's group (its index in int32:
    # an int64 division is a PTX subroutine whose stack showed as spills)
    p_blk, c_blk, n = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    h, w, c, ok = _tile(p_blk, c_blk, W, P, C, BLOCK_P, BLOCK_C)
    gc = (tl.program_id(2) // GS) * C + c
    v = tl.load(x + n * sx_n + h * sx_h + w * sx_w + c * sx_c, mask=ok, other=0.0).to(tl.float32)
    out = (v - tl.load(mean + gc, mask=c < C, other=0.0)) * tl.load(scale + gc, mask=c < C, other=0.0)
    out += tl.load(shift + gc, mask=c < C, other=0.0)
    if HAS_RES:
        out += tl.load(res + n * sr_n + h * sr_h + w * sr_w + c * sr_c, mask=ok, other=0.0).to(tl.float32)
    if RELU:
        out = tl.maximum(out, 0.0)
    tl.store(y + n * sy_n + h * sy_h + w * sy_w + c * sy_c, out.to(y.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_reduce_kernel(dy, y, x, dyp, mean, psum, psum_xc, C, W, P, GS,
                       sd_n, sd_c, sd_h, sd_w, sy_n, sy_c, sy_h, sy_w, sx_n, sx_c, sx_h, sx_w,
                       so_n, so_c, so_h, so_w, RELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # per tile: sum dy' and sum dy' * (x - mean), dy' = dy where y > 0 (written once: the residual's gradient)
    p_blk, c_blk, n = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    h, w, c, ok = _tile(p_blk, c_blk, W, P, C, BLOCK_P, BLOCK_C)
    g = tl.load(dy + n * sd_n + h * sd_h + w * sd_w + c * sd_c, mask=ok, other=0.0).to(tl.float32)
    if RELU:
        yv = tl.load(y + n * sy_n + h * sy_h + w * sy_w + c * sy_c, mask=ok, other=0.0)
        g = tl.where(yv > 0, g, 0.0)
        tl.store(dyp + n * so_n + h * so_h + w * so_w + c * so_c, g.to(dyp.dtype.element_ty), mask=ok)
    xc = tl.load(x + n * sx_n + h * sx_h + w * sx_w + c * sx_c, mask=ok, other=0.0).to(tl.float32)
    xc = tl.where(ok, xc - tl.load(mean + (tl.program_id(2) // GS) * C + c, mask=c < C, other=0.0), 0.0)
    out = (n * tl.num_programs(0) + p_blk) * C + c_blk * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c_blk * BLOCK_C + tl.arange(0, BLOCK_C) < C
    tl.store(psum + out, tl.sum(g, axis=0), mask=cm)
    tl.store(psum_xc + out, tl.sum(g * xc, axis=0), mask=cm)


@triton.jit
def _bwd_dx_kernel(dyp, x, dx, mean, k1, k2, k3, C, W, P, GS,
                   sd_n, sd_c, sd_h, sd_w, sx_n, sx_c, sx_h, sx_w, so_n, so_c, so_h, so_w,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # dx = k1 * dy' + k2 * (x - mean) + k3, the coefficients of the image's group
    p_blk, c_blk, n = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    h, w, c, ok = _tile(p_blk, c_blk, W, P, C, BLOCK_P, BLOCK_C)
    gc = (tl.program_id(2) // GS) * C + c
    mu = tl.load(mean + gc, mask=c < C, other=0.0)
    a1 = tl.load(k1 + gc, mask=c < C, other=0.0)
    a2 = tl.load(k2 + gc, mask=c < C, other=0.0)
    a3 = tl.load(k3 + gc, mask=c < C, other=0.0)
    g = tl.load(dyp + n * sd_n + h * sd_h + w * sd_w + c * sd_c, mask=ok, other=0.0).to(tl.float32)
    xc = tl.load(x + n * sx_n + h * sx_h + w * sx_w + c * sx_c, mask=ok, other=0.0).to(tl.float32) - mu
    out = a1 * g + a2 * xc + a3
    tl.store(dx + n * so_n + h * so_h + w * so_w + c * so_c, out.to(dx.dtype.element_ty), mask=ok)


def _grid(x: torch.Tensor) -> tuple[tuple[int, int, int], int, int]:
    n, c, h, w = x.shape
    bp, bc = _blocks(h * w, c)
    return (triton.cdiv(h * w, bp), triton.cdiv(c, bc), n), bp, bc


def _check_offsets(*tensors: torch.Tensor) -> None:
    for t in tensors:  # offsets inside one image are int32 (the image offset is int64)
        if sum((n - 1) * abs(s) for n, s in zip(t.shape[1:], t.stride()[1:])) >= 2**31:
            raise ValueError(f"bn_act: one image spans more than 2**31 elements, shape {tuple(t.shape)}")


def _combine(part_a: torch.Tensor, part_b: torch.Tensor, groups: int, x: torch.Tensor, block_p: int, stats: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Partials (N, pixel blocks, C) -> per group (G, C). stats: Chan's combination of block means and squared
    deviations into the group mean and biased variance; else plain sums."""
    n, c, h, w = x.shape
    a = part_a.view(groups, -1, c)
    b = part_b.view(groups, -1, c)
    if not stats:
        return a.sum(1), b.sum(1)
    n_blk = part_a.shape[1]
    # pixels per block (the last block is partial), from the shapes alone: no host read
    cnt = (h * w - block_p * torch.arange(n_blk, device=x.device, dtype=torch.float32)).clamp(max=block_p)
    cnt = cnt.repeat(n // groups)[None, :, None]
    total = float(n // groups * h * w)
    mean = (a * cnt).sum(1) / total
    var = (b + cnt * (a - mean[:, None]) ** 2).sum(1) / total
    return mean, var


@torch.library.custom_op("dsp_fast::bn_stats", mutates_args=())
def _bn_stats_op(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group and channel: mean and biased variance (fp32)."""
    grid, bp, bc = _grid(x)
    pm = torch.empty((x.shape[0], grid[0], x.shape[1]), dtype=torch.float32, device=x.device)
    pm2 = torch.empty_like(pm)
    if x.numel():
        _stats_kernel[grid](x, pm, pm2, x.shape[1], x.shape[3], x.shape[2] * x.shape[3], *x.stride(),
                            BLOCK_P=bp, BLOCK_C=bc, num_warps=_WARPS)
    return _combine(pm, pm2, groups, x, bp, stats=True)


@_bn_stats_op.register_fake
def _(x, groups):
    return x.new_empty((groups, x.shape[1]), dtype=torch.float32), x.new_empty((groups, x.shape[1]),
                                                                               dtype=torch.float32)


@torch.library.custom_op("dsp_fast::bn_act_fwd", mutates_args=())
def _bn_act_fwd_op(x: torch.Tensor, residual: torch.Tensor | None, mean_GC: torch.Tensor, scale_GC: torch.Tensor,
                   shift_GC: torch.Tensor, relu: bool) -> torch.Tensor:
    y = torch.empty_like(x)  # preserve_format: channels_last in, channels_last out
    if x.numel():
        n, c, h, w = x.shape
        grid, bp, bc = _grid(x)
        res = x if residual is None else residual  # a placeholder pointer when there is none (never read)
        _fwd_kernel[grid](x, res, y, mean_GC, scale_GC, shift_GC, c, w, h * w, n // mean_GC.shape[0],
                          *x.stride(), *res.stride(), *y.stride(), HAS_RES=residual is not None, RELU=relu,
                          BLOCK_P=bp, BLOCK_C=bc, num_warps=_WARPS)
    return y


@_bn_act_fwd_op.register_fake
def _(x, residual, mean_GC, scale_GC, shift_GC, relu):
    return torch.empty_like(x)


@torch.library.custom_op("dsp_fast::bn_act_bwd_reduce", mutates_args=())
def _bn_bwd_reduce_op(dy: torch.Tensor, y: torch.Tensor | None, x: torch.Tensor, mean_GC: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dy' (empty without ReLU: dy' is dy), sum dy' (G, C), sum dy' * (x - mean) (G, C)); y given = ReLU."""
    groups = mean_GC.shape[0]
    dyp = torch.empty_like(dy) if y is not None else dy.new_empty(0)
    grid, bp, bc = _grid(x)
    ps = torch.empty((x.shape[0], grid[0], x.shape[1]), dtype=torch.float32, device=x.device)
    ps_xc = torch.empty_like(ps)
    if x.numel():
        n, c, h, w = x.shape
        yy, out = (y, dyp) if y is not None else (dy, dy)  # placeholders without ReLU (never read or written)
        _bwd_reduce_kernel[grid](dy, yy, x, out, mean_GC, ps, ps_xc, c, w, h * w, n // groups,
                                 *dy.stride(), *yy.stride(), *x.stride(), *out.stride(),
                                 RELU=y is not None, BLOCK_P=bp, BLOCK_C=bc, num_warps=_WARPS)
    s, s_xc = _combine(ps, ps_xc, groups, x, bp, stats=False)
    return dyp, s, s_xc


@_bn_bwd_reduce_op.register_fake
def _(dy, y, x, mean_GC):
    g, c = mean_GC.shape
    return (torch.empty_like(dy) if y is not None else dy.new_empty(0), x.new_empty((g, c), dtype=torch.float32),
            x.new_empty((g, c), dtype=torch.float32))


@torch.library.custom_op("dsp_fast::bn_act_bwd_dx", mutates_args=())
def _bn_bwd_dx_op(dyp: torch.Tensor, x: torch.Tensor, mean_GC: torch.Tensor, k1_GC: torch.Tensor,
                  k2_GC: torch.Tensor, k3_GC: torch.Tensor) -> torch.Tensor:
    dx = torch.empty_like(x)
    if x.numel():
        n, c, h, w = x.shape
        grid, bp, bc = _grid(x)
        _bwd_dx_kernel[grid](dyp, x, dx, mean_GC, k1_GC, k2_GC, k3_GC, c, w, h * w, n // mean_GC.shape[0],
                             *dyp.stride(), *x.stride(), *dx.stride(), BLOCK_P=bp, BLOCK_C=bc, num_warps=_WARPS)
    return dx


@_bn_bwd_dx_op.register_fake
def _(dyp, x, mean_GC, k1_GC, k2_GC, k3_GC):
    return torch.empty_like(x)


class _BnAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, mean_GC, var_GC, eps, relu, batch_stats):
        rstd_GC = torch.rsqrt(var_GC + eps)
        # every (G, C) vector made by broadcasting against rstd: contiguous, as the kernels index them
        scale_GC = rstd_GC * weight.float() if weight is not None else rstd_GC
        shift_GC = torch.zeros_like(rstd_GC) + bias.float() if bias is not None else torch.zeros_like(rstd_GC)
        y = torch.ops.dsp_fast.bn_act_fwd(x, residual, mean_GC, scale_GC, shift_GC, relu)
        ctx.save_for_backward(x, y if relu else None, weight, mean_GC, rstd_GC)
        ctx.batch_stats = batch_stats  # statistics of this batch: their gradient flows into dx
        ctx.has_res = residual is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, y, weight, mean_GC, rstd_GC = ctx.saved_tensors
        dyp, s_GC, s_xc_GC = torch.ops.dsp_fast.bn_act_bwd_reduce(dy, y, x, mean_GC)
        if y is None:
            dyp = dy
        k1 = rstd_GC * weight.float() if weight is not None else rstd_GC
        if ctx.batch_stats:
            m = x.numel() // x.shape[1] // rstd_GC.shape[0]
            k2, k3 = -k1 * rstd_GC * rstd_GC * s_xc_GC / m, -k1 * s_GC / m
        else:  # running statistics are constants
            k2 = k3 = torch.zeros_like(rstd_GC)
        dx = torch.ops.dsp_fast.bn_act_bwd_dx(dyp, x, mean_GC, k1, k2, k3)
        dw = (rstd_GC * s_xc_GC).sum(0).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = s_GC.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        return dx, dw, db, dyp if ctx.has_res else None, None, None, None, None, None


def _group_count(n: int, group_size: int) -> int:
    if group_size <= 0 or n <= group_size:
        return 1
    if n % group_size:
        raise ValueError(f"bn_act: a batch of {n} images does not split into groups of {group_size}")
    return n // group_size


def bn_act(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
           running_mean: torch.Tensor | None, running_var: torch.Tensor | None, training: bool,
           momentum: float = 0.1, eps: float = 1e-5, group_size: int = 0, residual: torch.Tensor | None = None,
           relu: bool = True) -> torch.Tensor:
    """relu(batch_norm(x) + residual) as `nn.BatchNorm2d` (+ add, + ReLU) computes it, in two passes each way.

    training: statistics of the batch, per group of `group_size` images (0: one group), the running statistics
    (when given) moved group by group in order, as separate BN calls move them (num_batches_tracked is the
    caller's); else the running statistics. x (N, C, H, W) fp32/fp16/bf16, NCHW or channels_last; residual like
    x (any strides) or None; relu False: BN (+ residual) only. Differentiable w.r.t. x, residual, weight, bias."""
    check_bn_act(x, weight, bias, running_mean, running_var, training, residual)
    if not use_triton(x):
        return twins.bn_act(x, weight, bias, running_mean, running_var, training, momentum, eps, group_size,
                            residual, relu)
    _check_offsets(x, *([] if residual is None else [residual]))
    batch_stats = training or running_mean is None  # as nn.BatchNorm2d without running statistics
    if batch_stats:
        groups = _group_count(x.shape[0], group_size) if training else 1
        mean_GC, var_GC = torch.ops.dsp_fast.bn_stats(x.detach(), groups)
        if training and running_mean is not None and running_var is not None:
            m = x.numel() // x.shape[1] // groups
            with torch.no_grad():
                for g in range(groups):  # as separate calls: group by group, unbiased variance
                    running_mean.lerp_(mean_GC[g], momentum)
                    running_var.lerp_(var_GC[g] * (m / max(m - 1, 1)), momentum)
    else:
        mean_GC, var_GC = running_mean.float()[None], running_var.float()[None]
    return _BnAct.apply(x, weight, bias, residual, mean_GC, var_GC, eps, relu, batch_stats)
