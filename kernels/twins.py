"""Plain-PyTorch twins of the kernels: the naive formulation, same signatures, written to be read beside the paper.

Shapes: B batch, C channels, H x W full crop size, h x w feature size (stride 8), K number of classes, N / M rows
of the two MMD samples. The oracle of the kernel tests and what the reference trainer runs; not meant to be fast."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import (
    IGNORE_LABEL,
    check_bn_act,
    check_label_values,
    check_mmd,
    check_soft_paste,
    check_upsample_pool,
    check_weighted_mmd,
)


def dual_soft_paste(tmpl_img: torch.Tensor, tmpl_label: torch.Tensor, class_sel: torch.Tensor,
                    src_img: torch.Tensor, src_label: torch.Tensor, tgt_img: torch.Tensor,
                    tgt_pseudo: torch.Tensor, lam: float, pasted: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """DSP step 4: M = tmpl_label in the chosen classes, or pasted by the long-tail paste (`pasted`, (B, H, W)
    bool, optional); the same M pastes the template onto both destinations.

    Returns (src_mix_img, src_mix_label, tgt_mix_img, tgt_mix_label, mask_BHW)."""
    check_soft_paste(tmpl_img, tmpl_label, class_sel, src_img, src_label, tgt_img, tgt_pseudo, lam, pasted)
    num_classes = class_sel.shape[1]
    check_label_values({"tmpl_label": tmpl_label, "src_label": src_label, "tgt_pseudo": tgt_pseudo}, num_classes)
    # M[b, y, x] = class_sel[b, tmpl_label[b, y, x]], read from the table (not isin over its nonzero entries, whose
    # shape depends on the data: a host sync); the ignore label (and, with value checks off, any label outside
    # [0, K), as in the kernel) looks up a False column
    table_BK1 = torch.cat([class_sel, class_sel.new_zeros(class_sel.shape[0], 1)], dim=1)
    ids = tmpl_label.long()
    ids_BP = torch.where((ids < 0) | (ids >= num_classes), num_classes, ids).flatten(1)
    mask_BHW = table_BK1.gather(1, ids_BP).view_as(tmpl_label)
    if pasted is not None:
        mask_BHW = mask_BHW | pasted
    m_B1HW = mask_BHW[:, None].to(tmpl_img.dtype)
    src_mix_img = lam * m_B1HW * tmpl_img + (1 - lam * m_B1HW) * src_img
    tgt_mix_img = lam * m_B1HW * tmpl_img + (1 - lam * m_B1HW) * tgt_img
    src_mix_label = torch.where(mask_BHW, tmpl_label, src_label)
    tgt_mix_label = torch.where(mask_BHW, tmpl_label, tgt_pseudo)
    return src_mix_img, src_mix_label, tgt_mix_img, tgt_mix_label, mask_BHW


def upsample_bilinear(x: torch.Tensor, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, H, W), bilinear: F.interpolate itself."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


def masked_upsample_pool(feat: torch.Tensor, mask: torch.Tensor | None, size: tuple[int, int],
                         align_corners: bool = True) -> torch.Tensor:
    """mean over the H*W pixels of mask * bilinear_upsample(feat, size): (B, C). mask=None means all ones."""
    size = check_upsample_pool(feat, mask, size)
    up_BCHW = F.interpolate(feat, size=size, mode="bilinear", align_corners=align_corners)
    if mask is not None:
        up_BCHW = up_BCHW * mask[:, None].to(up_BCHW.dtype)
    return up_BCHW.mean(dim=(2, 3))


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, kernel_mul: float = 2.0, kernel_num: int = 5) -> torch.Tensor:
    """Biased multi-bandwidth Gaussian MMD between the rows of x (N, C) and y (M, C), as the authors' code computes it.

    Computed in float32 whatever the input dtype (the inputs are tiny; exp(-d2/bw) in half precision is not).
    The bandwidth beta is the mean off-diagonal squared distance, detached (no gradient through it). One deviation:
    when every row is identical beta is 0 and the authors' formula gives NaN; here beta becomes 1 in that case,
    which gives 0 (the MMD of identical samples under any bandwidth) and a zero gradient."""
    check_mmd(x, y, kernel_mul, kernel_num)
    n_x = x.shape[0]
    total_NC = torch.cat([x, y], dim=0).float()
    n = total_NC.shape[0]
    d2_NN = ((total_NC.unsqueeze(0) - total_NC.unsqueeze(1)) ** 2).sum(2)
    beta = d2_NN.detach().sum() / (n * n - n)  # n >= 2: x and y have a row each
    beta = torch.where(beta > 0, beta, torch.ones_like(beta))
    bandwidths = [beta * kernel_mul ** (j - kernel_num // 2) for j in range(kernel_num)]
    k_NN = sum(torch.exp(-d2_NN / bw) for bw in bandwidths)
    xx, yy = k_NN[:n_x, :n_x], k_NN[n_x:, n_x:]
    xy, yx = k_NN[:n_x, n_x:], k_NN[n_x:, :n_x]
    return xx.mean() + yy.mean() - xy.mean() - yx.mean()


def weighted_mmd(feat_s: torch.Tensor, feat_t: torch.Tensor, mask: torch.Tensor, size: tuple[int, int],
                 kernel_mul: float = 2.0, kernel_num: int = 5, gather=None) -> torch.Tensor:
    """DSP's MMD term (before the factor c): MMD of the global pools of the stride-8 features + MMD of the
    mask-weighted pools of the upsampled features (bilinear, align_corners=True, as the authors' nn.Upsample).
    gather: as the fast twin's."""
    size = check_weighted_mmd(feat_s, feat_t, mask, size)
    # as the authors: the global pool of the stride-8 map; the upsampled map, times M, for the masked pool
    up_s_BCHW = F.interpolate(feat_s, size=size, mode="bilinear", align_corners=True)
    up_t_BCHW = F.interpolate(feat_t, size=size, mode="bilinear", align_corners=True)
    m_B1HW = mask[:, None].to(up_s_BCHW.dtype)
    pools_B4C = torch.stack([feat_s.mean(dim=(2, 3)), feat_t.mean(dim=(2, 3)),
                             (m_B1HW * up_s_BCHW).mean(dim=(2, 3)), (m_B1HW * up_t_BCHW).mean(dim=(2, 3))], dim=1)
    if gather is not None:
        pools_B4C = gather(pools_B4C)
    glob_s, glob_t, mask_s, mask_t = pools_B4C.unbind(1)
    global_mmd = mmd_rbf(glob_s, glob_t, kernel_mul, kernel_num)
    masked_mmd = mmd_rbf(mask_s, mask_t, kernel_mul, kernel_num)
    return global_mmd + masked_mmd

def bn_act(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
           running_mean: torch.Tensor | None, running_var: torch.Tensor | None, training: bool,
           momentum: float = 0.1, eps: float = 1e-5, group_size: int = 0, residual: torch.Tensor | None = None,
           relu: bool = True) -> torch.Tensor:
    """relu(batch_norm(x) + residual): one F.batch_norm call per group of `group_size` images in training (0: one
    group), as the per-group BN layers make them; the running statistics move group by group."""
    check_bn_act(x, weight, bias, running_mean, running_var, training, residual)
    n = x.shape[0]
    if training and 0 < group_size < n:
        if n % group_size:
            raise ValueError(f"bn_act: a batch of {n} images does not split into groups of {group_size}")
        parts = x.split(group_size)
    else:
        parts = (x,)
    batch_stats = training or running_mean is None
    y_NCHW = [F.batch_norm(p, running_mean, running_var, weight, bias, batch_stats, momentum, eps) for p in parts]
    y_NCHW = y_NCHW[0] if len(y_NCHW) == 1 else torch.cat(y_NCHW)
    if residual is not None:
        y_NCHW = y_NCHW + residual
    return F.relu(y_NCHW) if relu else y_NCHW


__all__ = ["IGNORE_LABEL", "bn_act", "dual_soft_paste", "masked_upsample_pool", "mmd_rbf", "weighted_mmd"]
