"""Multi-bandwidth Gaussian MMD and DSP's weighted MMD over upsampled features, without the upsampled tensor.
Twins: `twins.mmd_rbf`, `twins.weighted_mmd`.

Shapes: B batch, C channels (256), h x w stride-8 features, H x W crop, S stacked MMD problems (2 in weighted_mmd:
global and masked pools), N = rows of x + rows of y.

Why plain PyTorch for the MMD itself, not a Triton kernel: its inputs are (2B, C) = 4 x 256 values (8 KB,
~10 kFLOP), so any kernel is bound by launch latency. This version runs 25 ATen kernels forward and 14 backward
(bench/bench_kernels.py::test_mmd_rbf_fwd_bwd; the textbook twin 41 + 44): in the trainer's CUDA graph about 0.1 ms,
~1% of a step's compute floor. A single-program Triton forward + backward would make it 2 launches: worth it only
if a GPU profile shows those 0.1 ms (not yet measured). The two MMDs of weighted_mmd are stacked into one batched
evaluation so that they share every launch. Autograd's backward of these ops is exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import twins
from ._common import check_mmd, check_weighted_mmd, twins_forced
from .upsample_pool import adjoint_map, pool_with_maps

RowGather = Callable[[torch.Tensor], torch.Tensor]


def mmd_rbf_stacked(x_SNC: torch.Tensor, y_SMC: torch.Tensor, kernel_mul: float = 2.0,
                    kernel_num: int = 5) -> torch.Tensor:
    """(S,) MMDs of S independent problems at once, each exactly as `twins.mmd_rbf` (float32, detached
    bandwidth, beta := 1 when all rows coincide)."""
    n_x = x_SNC.shape[1]
    total_SNC = torch.cat([x_SNC, y_SMC], dim=1).float()
    n = total_SNC.shape[1]
    # pairwise differences, not the |a|^2 + |b|^2 - 2ab expansion: that cancels badly when samples are close,
    # and at N = 4 the (S, N, N, C) difference tensor is a few KB
    d2_SNN = (total_SNC.unsqueeze(1) - total_SNC.unsqueeze(2)).pow(2).sum(3)
    beta_S = d2_SNN.detach().sum(dim=(1, 2)) / (n * n - n)
    beta_S = torch.where(beta_S > 0, beta_S, torch.ones_like(beta_S))
    exps_J = torch.arange(kernel_num, device=x_SNC.device, dtype=torch.float32) - kernel_num // 2
    bw_SJ = beta_S[:, None] * kernel_mul ** exps_J
    k_SNN = torch.exp(-d2_SNN[:, None] / bw_SJ[:, :, None, None]).sum(1)
    # mean(Kxx) + mean(Kyy) - mean(Kxy) - mean(Kyx) = v^T K v with v = (1/n_x, ..., -1/n_y, ...)
    v_N = torch.where(torch.arange(n, device=x_SNC.device) < n_x, 1.0 / n_x, -1.0 / (n - n_x))
    return (k_SNN * (v_N[:, None] * v_N[None, :])).sum(dim=(1, 2))


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, kernel_mul: float = 2.0, kernel_num: int = 5) -> torch.Tensor:
    """Biased multi-bandwidth Gaussian MMD between the rows of x (N, C) and y (M, C), a float32 scalar, as
    `twins.mmd_rbf` and docs/method.md (bandwidths around the detached mean pairwise squared distance)."""
    check_mmd(x, y, kernel_mul, kernel_num)
    return mmd_rbf_stacked(x[None], y[None], kernel_mul, kernel_num)[0]


def _weighted_mmd_fused(feat_s: torch.Tensor, feat_t: torch.Tensor, mask: torch.Tensor, size: tuple[int, int],
                        kernel_mul: float, kernel_num: int, gather: RowGather | None = None) -> torch.Tensor:
    n_b = feat_s.shape[0]
    feat_hw = tuple(feat_s.shape[-2:])
    # the global term pools the stride-8 map itself (as the authors' script): a uniform 1/(h*w) map
    a_ones_1hw = torch.full((1, *feat_hw), 1.0 / (feat_hw[0] * feat_hw[1]), dtype=feat_s.dtype, device=feat_s.device)
    a_mask_Bhw = adjoint_map(mask, feat_hw, size, True, feat_s.dtype, feat_s.device)
    # both pools of one feature map in one product: feat is read once for the global and the masked pool
    a_B2hw = torch.stack([a_ones_1hw.expand(n_b, -1, -1), a_mask_Bhw], dim=1)
    pools_s_BC2 = pool_with_maps(feat_s, a_B2hw)
    pools_t_BC2 = pool_with_maps(feat_t, a_B2hw)
    if gather is not None:  # every rank's pooled vectors: the MMD of the global batch, in one collective
        pools_s_BC2, pools_t_BC2 = gather(torch.cat([pools_s_BC2, pools_t_BC2], dim=2)).chunk(2, dim=2)
    return mmd_rbf_stacked(pools_s_BC2.permute(2, 0, 1), pools_t_BC2.permute(2, 0, 1), kernel_mul, kernel_num).sum()


def weighted_mmd(feat_s: torch.Tensor, feat_t: torch.Tensor, mask: torch.Tensor, size: tuple[int, int],
                 kernel_mul: float = 2.0, kernel_num: int = 5, gather: RowGather | None = None) -> torch.Tensor:
    """DSP's MMD term before its factor c: MMD(GAP(feat_s), GAP(feat_t)) + MMD(GAP(M*up(feat_s)), GAP(M*up(feat_t))),
    with up = bilinear to `size`, align_corners=True: the global term pools the stride-8 maps, the masked term the
    upsampled ones (as the authors' script).

    feat_s, feat_t (B, C, h, w); mask (B, H, W) bool or float at `size`. Differentiable w.r.t. both features; no
    B*C*H*W tensor is built. gather: with several ranks, an autograd-aware all-gather along dim 0 of the pooled
    vectors, so the MMD runs over the global batch's 2B vectors (None on one process); called once per step, as
    several autograd gathers in one backward need not run in the same order on every rank."""
    size = check_weighted_mmd(feat_s, feat_t, mask, size)
    check_mmd(feat_s[:, :, 0, 0], feat_t[:, :, 0, 0], kernel_mul, kernel_num)
    if twins_forced():
        return twins.weighted_mmd(feat_s, feat_t, mask, size, kernel_mul, kernel_num, gather)
    return _weighted_mmd_fused(feat_s, feat_t, mask, size, kernel_mul, kernel_num, gather)
