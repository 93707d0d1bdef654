"""Batch norm (training statistics per group of images, or running statistics) + optional residual add + optional
ReLU, forward and backward, each as one elementwise pass. Twin: `twins.bn_act`.

Shapes: N images of C channels, H x W pixels, P = H*W; images split into G groups of GS = N / G images, each with
its own statistics (the batched student's per-group BN); `_GC` tensors hold one fp32 value per group and channel.

Passes over HBM (x, residual, y, dy, dx the size of x):
  forward   statistics: read x                      elementwise: read x (+ residual), write y
  backward  reductions: read dy, y, x (write dy')   elementwise: read dy', x, write dx
where dy' = dy * (y > 0) is also the residual's gradient (no pass of its own). Eager torch makes a pass per
operator (BN's two, ReLU's, the add's, and their backwards). Each reduction writes per-row partials (a row: TILES
tiles of BLOCK_P pixels of one image), and one small finalize kernel per direction turns them into what the
elementwise pass needs (forward: mean, rstd, scale, shift, and the running statistics moved; backward: dx's
coefficients and the weight and bias gradients), where torch's per-channel operators would take ~15 launches a
layer. Statistics are partial means and squared deviations combined in fp32 (Chan's formula): no cancellation of
sum(x^2) - sum(x)^2, no atomics (deterministic).
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
_FIN_R, _FIN_C = 64, 32  # the finalize kernels' (rows, channels) per step: partial rows of one group, channels
_TILES = 8  # pixel tiles per program of the two reductions (their partial rows: 8 x 32 pixels each)


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
                  TILES: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # grid (pixel rows of TILES tiles, channel blocks, N): per channel, the mean and sum of squared deviations of
    # the row's pixels, tile by tile combined by Chan's formula (fewer partial rows for the finalize to read)
    p_row, c_blk, n = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    n_acc = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for t in range(TILES):
        h, w, c, ok = _tile(p_row * TILES + t, c_blk, W, P, C, BLOCK_P, BLOCK_C)
        v = tl.load(x + n * sx_n + h * sx_h + w * sx_w + c * sx_c, mask=ok, other=0.0).to(tl.float32)
        n_t = tl.sum(ok.to(tl.float32), axis=0)  # 0 past C or past the last pixel
        mean_t = tl.sum(v, axis=0) / tl.maximum(n_t, 1.0)
        d = tl.where(ok, v - mean_t[None, :], 0.0)
        n_new = n_acc + n_t
        frac = n_t / tl.maximum(n_new, 1.0)
        delta = mean_t - mean
        mean += delta * frac
        m2 += tl.sum(d * d, axis=0) + delta * delta * n_acc * frac
        n_acc = n_new
    out = (n * tl.num_programs(0) + p_row) * C + c_blk * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c_blk * BLOCK_C + tl.arange(0, BLOCK_C) < C
    tl.store(pmean + out, mean, mask=cm)
    tl.store(pm2 + out, m2, mask=cm)


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
                       so_n, so_c, so_h, so_w, RELU: tl.constexpr, TILES: tl.constexpr, BLOCK_P: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    # per row of TILES tiles: sum dy' and sum dy' * (x - mean), dy' = dy where y > 0 (written once: the residual's
    # gradient)
    p_row, c_blk, n = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    cm = c_blk * BLOCK_C + tl.arange(0, BLOCK_C) < C
    mu = tl.load(mean + (tl.program_id(2) // GS) * C + c_blk * BLOCK_C + tl.arange(0, BLOCK_C), mask=cm, other=0.0)
    s = tl.zeros([BLOCK_C], tl.float32)
    s_xc = tl.zeros([BLOCK_C], tl.float32)
    for t in range(TILES):
        h, w, c, ok = _tile(p_row * TILES + t, c_blk, W, P, C, BLOCK_P, BLOCK_C)
        g = tl.load(dy + n * sd_n + h * sd_h + w * sd_w + c * sd_c, mask=ok, other=0.0).to(tl.float32)
        if RELU:
            yv = tl.load(y + n * sy_n + h * sy_h + w * sy_w + c * sy_c, mask=ok, other=0.0)
            g = tl.where(yv > 0, g, 0.0)
            tl.store(dyp + n * so_n + h * so_h + w * so_w + c * so_c, g.to(dyp.dtype.element_ty), mask=ok)
        xc = tl.load(x + n * sx_n + h * sx_h + w * sx_w + c * sx_c, mask=ok, other=0.0).to(tl.float32)
        xc = tl.where(ok, xc - mu[None, :], 0.0)
        s += tl.sum(g, axis=0)
        s_xc += tl.sum(g * xc, axis=0)
    out = (n * tl.num_programs(0) + p_row) * C + c_blk * BLOCK_C + tl.arange(0, BLOCK_C)
    tl.store(psum + out, s, mask=cm)
    tl.store(psum_xc + out, s_xc, mask=cm)


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


@triton.jit
def _stats_finalize_kernel(pmean, pm2, weight, bias, rmean, rvar, mean_out, rstd_out, scale_out, shift_out,
                           C, P, NBLK, ROWS_G, G, momentum, eps, unbias,
                           HAS_W: tl.constexpr, HAS_B: tl.constexpr, RUNNING: tl.constexpr, LERP_HIGH: tl.constexpr,
                           BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # grid (channel blocks,): per group, the tiles' partial means and squared deviations (rows g*ROWS_G.. of
    # (N * NBLK, C)) combined by Chan's formula, BLOCK_R rows at a time; then rstd, scale, shift, and the running
    # statistics moved group by group as torch's lerp_ moves them. One launch instead of ~20 small torch operators.
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    w = tl.load(weight + c, mask=cm, other=1.0).to(tl.float32) if HAS_W else tl.full([BLOCK_C], 1.0, tl.float32)
    b = tl.load(bias + c, mask=cm, other=0.0).to(tl.float32) if HAS_B else tl.zeros([BLOCK_C], tl.float32)
    if RUNNING:
        rm = tl.load(rmean + c, mask=cm, other=0.0).to(tl.float32)
        rv = tl.load(rvar + c, mask=cm, other=0.0).to(tl.float32)
    for g in range(G):
        n_acc = tl.zeros([BLOCK_C], tl.float32)
        mean = tl.zeros([BLOCK_C], tl.float32)
        m2 = tl.zeros([BLOCK_C], tl.float32)
        for r0 in range(0, ROWS_G, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            rok = r < ROWS_G
            cnt = tl.where(rok, tl.minimum(P - (r % NBLK) * BLOCK_P, BLOCK_P), 0).to(tl.float32)
            idx = (g * ROWS_G + r)[:, None] * C + c[None, :]
            ok = rok[:, None] & cm[None, :]
            a = tl.load(pmean + idx, mask=ok, other=0.0)
            n_t = tl.sum(cnt, axis=0)
            mean_t = tl.sum(a * cnt[:, None], axis=0) / n_t
            d = a - mean_t[None, :]
            m2_t = tl.sum(tl.load(pm2 + idx, mask=ok, other=0.0) + cnt[:, None] * d * d, axis=0)
            n_new = n_acc + n_t
            delta = mean_t - mean
            mean += delta * (n_t / n_new)
            m2 += m2_t + delta * delta * (n_acc * n_t / n_new)
            n_acc = n_new
        var = m2 / n_acc
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(mean_out + g * C + c, mean, mask=cm)
        tl.store(rstd_out + g * C + c, rstd, mask=cm)
        tl.store(scale_out + g * C + c, rstd * w, mask=cm)
        tl.store(shift_out + g * C + c, b, mask=cm)
        if RUNNING:  # torch's lerp_(end, weight): weight < 0.5 from self, else from end
            if LERP_HIGH:
                rm = mean - (mean - rm) * (1.0 - momentum)
                rv = var * unbias - (var * unbias - rv) * (1.0 - momentum)
            else:
                rm = rm + momentum * (mean - rm)
                rv = rv + momentum * (var * unbias - rv)
    if RUNNING:
        tl.store(rmean + c, rm.to(rmean.dtype.element_ty), mask=cm)
        tl.store(rvar + c, rv.to(rvar.dtype.element_ty), mask=cm)


@triton.jit
def _bwd_finalize_kernel(psum, psum_xc, rstd, weight, k1, k2, k3, dw, db, C, ROWS_G, G, m,
                         HAS_W: tl.constexpr, BATCH_STATS: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    # grid (channel blocks,): per group, the tiles' sums of dy' and dy' * (x - mean) summed, BLOCK_R rows at a time;
    # then dx's coefficients k1..k3 of the group, and the weight and bias gradients summed over the groups
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    w = tl.load(weight + c, mask=cm, other=1.0).to(tl.float32) if HAS_W else tl.full([BLOCK_C], 1.0, tl.float32)
    dw_acc = tl.zeros([BLOCK_C], tl.float32)
    db_acc = tl.zeros([BLOCK_C], tl.float32)
    for g in range(G):
        s = tl.zeros([BLOCK_C], tl.float32)
        s_xc = tl.zeros([BLOCK_C], tl.float32)
        for r0 in range(0, ROWS_G, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            idx = (g * ROWS_G + r)[:, None] * C + c[None, :]
            ok = (r < ROWS_G)[:, None] & cm[None, :]
            s += tl.sum(tl.load(psum + idx, mask=ok, other=0.0), axis=0)
            s_xc += tl.sum(tl.load(psum_xc + idx, mask=ok, other=0.0), axis=0)
        rs = tl.load(rstd + g * C + c, mask=cm, other=0.0)
        a1 = rs * w
        tl.store(k1 + g * C + c, a1, mask=cm)
        if BATCH_STATS:  # the statistics are this batch's: their gradient flows into dx
            tl.store(k2 + g * C + c, -a1 * rs * rs * s_xc / m, mask=cm)
            tl.store(k3 + g * C + c, -a1 * s / m, mask=cm)
        else:  # running statistics are constants
            tl.store(k2 + g * C + c, tl.zeros([BLOCK_C], tl.float32), mask=cm)
            tl.store(k3 + g * C + c, tl.zeros([BLOCK_C], tl.float32), mask=cm)
        dw_acc += rs * s_xc
        db_acc += s
    tl.store(dw + c, dw_acc, mask=cm)
    tl.store(db + c, db_acc, mask=cm)


def _reduce_tiles() -> int:
    """Pixel tiles one program of the reductions sums (each partial row covers TILES x BLOCK_P pixels): 8 on a GPU,
    so that the finalize reads 8 times fewer rows (at the stem's 257 x 257 maps, 65 steps of 64 rows per group
    become 9); 1 in the interpreter, whose tiles are large already."""
    return 1 if interpreting() else _TILES


def _grid(x: torch.Tensor, tiles: int = 1) -> tuple[tuple[int, int, int], int, int]:
    """(pixel rows of `tiles` tiles, channel blocks, N), BLOCK_P, BLOCK_C."""
    n, c, h, w = x.shape
    bp, bc = _blocks(h * w, c)
    return (triton.cdiv(h * w, bp * tiles), triton.cdiv(c, bc), n), bp, bc


def _check_offsets(*tensors: torch.Tensor) -> None:
    for t in tensors:  # offsets inside one image are int32 (the image offset is int64)
        if sum((n - 1) * abs(s) for n, s in zip(t.shape[1:], t.stride()[1:])) >= 2**31:
            raise ValueError(f"bn_act: one image spans more than 2**31 elements, shape {tuple(t.shape)}")


def _finalize_blocks(rows: int, n_c: int) -> tuple[int, int]:
    """(rows, channels) a finalize program reads per step: 64 x 32 fp32 on 4 warps (16 values per thread each)."""
    if interpreting():
        return min(next_pow2(rows), 256), min(next_pow2(n_c), 64)
    return _FIN_R, _FIN_C


def _opt(t: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    return placeholder if t is None else t  # a pointer the kernel never reads (its HAS_* flag is off)


@torch.library.custom_op("dsp_fast::bn_stats", mutates_args=("running_mean", "running_var"))
def _bn_stats_op(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                 running_mean: torch.Tensor | None, running_var: torch.Tensor | None, momentum: float, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group and channel (G, C) fp32: mean, 1/sqrt(var + eps), scale = rstd * weight, shift = bias; the running
    statistics (when given) moved group by group. Two launches: the tiles' partials, then their combination."""
    n, c, h, w = x.shape
    tiles = _reduce_tiles()
    grid, bp, bc = _grid(x, tiles)
    pm = torch.empty((n, grid[0], c), dtype=torch.float32, device=x.device)
    pm2 = torch.empty_like(pm)
    out = [torch.empty((groups, c), dtype=torch.float32, device=x.device) for _ in range(4)]
    if not x.numel():
        return tuple(t.fill_(float("nan")) for t in out)
    _stats_kernel[grid](x, pm, pm2, c, w, h * w, *x.stride(), TILES=tiles, BLOCK_P=bp, BLOCK_C=bc,
                        num_warps=_WARPS)
    rows = n // groups * grid[0]
    br, bcf = _finalize_blocks(rows, c)
    m = n // groups * h * w
    running = running_mean is not None and running_var is not None
    _stats_finalize_kernel[(triton.cdiv(c, bcf),)](
        pm, pm2, _opt(weight, pm), _opt(bias, pm), _opt(running_mean, pm), _opt(running_var, pm), *out,
        c, h * w, grid[0], rows, groups, momentum, eps, m / max(m - 1, 1),
        HAS_W=weight is not None, HAS_B=bias is not None, RUNNING=running, LERP_HIGH=momentum >= 0.5,
        BLOCK_P=bp * tiles, BLOCK_R=br, BLOCK_C=bcf, num_warps=_WARPS)
    return tuple(out)


@_bn_stats_op.register_fake
def _(x, groups, weight, bias, running_mean, running_var, momentum, eps):
    return tuple(x.new_empty((groups, x.shape[1]), dtype=torch.float32) for _ in range(4))


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
def _bn_bwd_reduce_op(dy: torch.Tensor, y: torch.Tensor | None, x: torch.Tensor, mean_GC: torch.Tensor,
                      rstd_GC: torch.Tensor, weight: torch.Tensor | None, batch_stats: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dy' (empty without ReLU: dy' is dy), dx's coefficients k1, k2, k3 (G, C), the weight and bias gradients
    (C,) fp32); y given = ReLU. Two launches: the tiles' sums, then their combination."""
    groups, c = mean_GC.shape
    dyp = torch.empty_like(dy) if y is not None else dy.new_empty(0)
    tiles = _reduce_tiles()
    grid, bp, bc = _grid(x, tiles)
    ps = torch.empty((x.shape[0], grid[0], c), dtype=torch.float32, device=x.device)
    ps_xc = torch.empty_like(ps)
    k = [torch.empty((groups, c), dtype=torch.float32, device=x.device) for _ in range(3)]
    dw, db = (torch.empty(c, dtype=torch.float32, device=x.device) for _ in range(2))  # the finalize writes them
    if not x.numel():
        return dyp, *k, dw.zero_(), db.zero_()
    n, _, h, w = x.shape
    yy, out = (y, dyp) if y is not None else (dy, dy)  # placeholders without ReLU (never read or written)
    _bwd_reduce_kernel[grid](dy, yy, x, out, mean_GC, ps, ps_xc, c, w, h * w, n // groups,
                             *dy.stride(), *yy.stride(), *x.stride(), *out.stride(),
                             RELU=y is not None, TILES=tiles, BLOCK_P=bp, BLOCK_C=bc, num_warps=_WARPS)
    rows = n // groups * grid[0]
    br, bcf = _finalize_blocks(rows, c)
    _bwd_finalize_kernel[(triton.cdiv(c, bcf),)](
        ps, ps_xc, rstd_GC, _opt(weight, ps), *k, dw, db, c, rows, groups, float(n // groups * h * w),
        HAS_W=weight is not None, BATCH_STATS=batch_stats, BLOCK_R=br, BLOCK_C=bcf, num_warps=_WARPS)
    return dyp, *k, dw, db


@_bn_bwd_reduce_op.register_fake
def _(dy, y, x, mean_GC, rstd_GC, weight, batch_stats):
    g, c = mean_GC.shape
    return (torch.empty_like(dy) if y is not None else dy.new_empty(0),
            *(x.new_empty((g, c), dtype=torch.float32) for _ in range(3)),
            x.new_empty((c,), dtype=torch.float32), x.new_empty((c,), dtype=torch.float32))


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
    def forward(ctx, x, weight, bias, residual, mean_GC, rstd_GC, scale_GC, shift_GC, relu, batch_stats):
        y = torch.ops.dsp_fast.bn_act_fwd(x, residual, mean_GC, scale_GC, shift_GC, relu)
        ctx.save_for_backward(x, y if relu else None, weight, mean_GC, rstd_GC)
        ctx.batch_stats = batch_stats  # statistics of this batch: their gradient flows into dx
        ctx.has_res = residual is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, y, weight, mean_GC, rstd_GC = ctx.saved_tensors
        dyp, k1, k2, k3, dw, db = torch.ops.dsp_fast.bn_act_bwd_reduce(dy, y, x, mean_GC, rstd_GC, weight,
                                                                       ctx.batch_stats)
        if y is None:
            dyp = dy
        dx = torch.ops.dsp_fast.bn_act_bwd_dx(dyp, x, mean_GC, k1, k2, k3)
        dw = dw.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = db.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        return dx, dw, db, dyp if ctx.has_res else None, None, None, None, None, None, None


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
    w, b = (None if t is None else t.detach() for t in (weight, bias))  # the backward computes their gradients
    if batch_stats:
        groups = _group_count(x.shape[0], group_size) if training else 1
        moved = training and running_mean is not None and running_var is not None
        mean_GC, rstd_GC, scale_GC, shift_GC = torch.ops.dsp_fast.bn_stats(
            x.detach(), groups, w, b, running_mean if moved else None, running_var if moved else None, momentum, eps)
    else:
        mean_GC, rstd_GC = running_mean.float()[None], torch.rsqrt(running_var.float()[None] + eps)
        # every (G, C) vector made by broadcasting against rstd: contiguous, as the kernels index them
        scale_GC = rstd_GC * w.float() if w is not None else rstd_GC
        shift_GC = torch.zeros_like(rstd_GC) + b.float() if b is not None else torch.zeros_like(rstd_GC)
    return _BnAct.apply(x, weight, bias, residual, mean_GC, rstd_GC, scale_GC, shift_GC, relu, batch_stats)
