"""The DSP step's math on the fast path: on the device, fixed shapes, no host sync, fused kernels.

Everything here can run inside a CUDA graph: random choices arrive as tensors, class selection is a sort over a
fixed (B, K) table instead of `unique`, the teacher update is three foreach ops with a device weight. Step numbers
refer to docs/method.md; `dsp_fast.reference` is the readable oracle this module is tested against. A new loss
term goes in `dsp_losses` (docs/extending.md): every entry of its `terms` joins the loss and the logs.

Shapes: B batch, K classes, L long-tail classes per step, H x W crop, h x w stride-8 features.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dsp_fast.augment import blur_kernel_shape, strong_augment
from dsp_fast.config import Config, DSPConfig
from dsp_fast.data import IGNORE_LABEL
from dsp_fast.kernels import dual_soft_paste, upsample_bilinear, weighted_mmd
from dsp_fast.models import unwrap


@dataclasses.dataclass
class DeviceChoices:
    """One step's random choices as device tensors of fixed shape (graph-capturable inputs)."""

    class_u: torch.Tensor  # (B, K) uniform draws ranking the present classes (step 2); (B, K+1) with
    # dsp.paste_ignore_label, column K ranking the ignore label
    lt_img: torch.Tensor  # (B*L, 3, H, W) long-tail crops, image-major: crop l of template b at b*L + l (step 3)
    lt_label: torch.Tensor  # (B*L, H, W) their labels
    lt_cls: torch.Tensor  # (L,) int64 the class crop l is pasted for (the same for every image); -1: no crop
    aug_src: torch.Tensor  # (B, AUG_COLS) jitter coin, 4 jitter factors, blur coin, sigma, 4 order keys (augment.py)
    aug_tgt: torch.Tensor  # (B, AUG_COLS) the same for the mixed target images


def draw_choices_(ch: DeviceChoices, gen: torch.Generator, d: DSPConfig) -> None:
    """Steps 2 and 4's random choices, drawn in place on the device: class ranks U(0,1); one jitter coin and one blur
    coin for the whole step (every mixed image shares them); per image brightness in +- s, contrast and saturation
    in 1 +- s, hue in +- s rad, sigma in U(0.15, 1.15), and four uniform keys whose argsort is the jitter order.
    Long-tail crops come from the loader."""
    ch.class_u.uniform_(generator=gen)
    s = d.jitter_strength
    for aug in (ch.aug_src, ch.aug_tgt):
        aug.uniform_(generator=gen)
        aug[:, 1].mul_(2 * s).sub_(s)
        aug[:, 2:4].mul_(2 * s).add_(1 - s)
        aug[:, 4].mul_(2 * s).sub_(s)
        aug[:, 6].add_(0.15)
    # the coins: column 0 and 5 of the source rows' first image, copied to every row of both tables
    jitter = ch.aug_src[0, 0] < d.jitter_p
    blur = ch.aug_src[0, 5] < d.blur_p
    for aug in (ch.aug_src, ch.aug_tgt):
        aug[:, 0] = jitter
        aug[:, 5] = blur


def present_classes(y_BHW: torch.Tensor, num_classes: int, with_ignore: bool = False) -> torch.Tensor:
    """(B, K) bool: class k occurs in image b (the ignore label excluded), by a scatter into a fixed table;
    with_ignore: (B, K+1), column K saying whether the ignore label occurs."""
    b = y_BHW.shape[0]
    ids = y_BHW.reshape(b, -1).long()
    ids = torch.where(ids == IGNORE_LABEL, num_classes, ids)  # a spare column soaks up the ignore label
    table = torch.zeros(b, num_classes + 1, dtype=torch.bool, device=y_BHW.device)
    table.scatter_(1, ids, True)
    return table if with_ignore else table[:, :num_classes]


def select_classes(y_m_BHW: torch.Tensor, class_u_BK: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Step 2: per image, half (rounded up) of the present classes, chosen uniformly: the ceil(n/2) present classes
    with the smallest uniform draws. Fixed shapes, no host sync. class_u with K+1 columns (num_classes = K given):
    the ignore label is a candidate too (dsp.paste_ignore_label), column K of the result."""
    k = class_u_BK.shape[1] if num_classes is None else num_classes
    present = present_classes(y_m_BHW, k, with_ignore=class_u_BK.shape[1] == k + 1)
    scores = torch.where(present, class_u_BK, torch.full_like(class_u_BK, 2.0))  # absent classes rank last
    rank = scores.argsort(dim=1).argsort(dim=1)
    n_chosen = (present.sum(dim=1, keepdim=True) + 1) // 2
    return rank < n_chosen


def paste_long_tail(x_m: torch.Tensor, y_m: torch.Tensor, lt_img: torch.Tensor, lt_label: torch.Tensor,
                    lt_cls: torch.Tensor, columns: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 3: hard-paste each template image's own crops (their class's pixels) onto it.

    columns (dsp.long_tail_paste 'columns', the script's oneMix of an (H, W) mask, which reads its first row): the
    crop's image and label are written in the full columns where the crop's first row holds the class.
    Returns (x_m, y_m, pasted): pasted (B, H, W) bool marks the class's pixels, which join M whatever the classes
    chosen in step 2."""
    b, n_lt = x_m.shape[0], lt_cls.shape[0]
    img = lt_img.unflatten(0, (b, n_lt))
    lab = lt_label.unflatten(0, (b, n_lt))
    pasted = torch.zeros_like(y_m, dtype=torch.bool)
    for i in range(n_lt):  # L is fixed (cfg.dsp.num_long_tail): an unrolled loop, graph-friendly
        hit_BHW = lab[:, i] == lt_cls[i]  # never true for cls = -1
        write_BHW = hit_BHW[:, :1].expand_as(hit_BHW) if columns else hit_BHW
        x_m = torch.where(write_BHW[:, None], img[:, i].to(x_m.dtype), x_m)
        y_m = torch.where(write_BHW, lab[:, i].to(y_m.dtype), y_m)
        pasted = pasted | hit_BHW
    return x_m, y_m, pasted


def class_mask(y_BHW: torch.Tensor, class_sel_BK1: torch.Tensor) -> torch.Tensor:
    """Step 2's part of M: class_sel[b, y[b, h, w]], the ignore label reading column K (B, K+1)."""
    k = class_sel_BK1.shape[1] - 1
    ids = torch.where(y_BHW == IGNORE_LABEL, k, y_BHW).long().flatten(1)
    return class_sel_BK1.gather(1, ids).view_as(y_BHW)


def script_masks(chosen_BHW: torch.Tensor, pasted_BHW: torch.Tensor, share_first_mask: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(paste mask, weight mask, MMD mask), each (B, H, W), from step 2's class mask and step 3's pasted pixels:
    all three chosen | pasted; with dsp.share_first_mask the script's indexing bug: image i is pasted with image 0's
    mask after the long-tail pastes of images 0..i (chosen_0 | pasted_0..i), image 0's weights and every image's MMD
    use it after all of them, the other images' weights their own chosen classes."""
    mask = chosen_BHW | pasted_BHW
    if not share_first_mask:
        return mask, mask, mask
    shared = chosen_BHW[0] | (pasted_BHW.to(torch.int32).cumsum(dim=0) > 0)  # row i: chosen_0 | pasted_0..i
    final = shared[-1]
    return shared, torch.cat([final[None], chosen_BHW[1:]]), final.expand_as(mask)


def seg_forward(model: torch.nn.Module, x: torch.Tensor, normalize: Callable[[torch.Tensor], torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits resized to the input size (bilinear, align_corners as the model class says: DeepLab True, MiT False),
    and the model's MMD features at their own stride. `model` may be a DDP wrapper (the student when distributed)."""
    logits, feat = model(normalize(x))
    align = unwrap(model).logits_align_corners  # a class attribute: no device read, capturable
    return upsample_bilinear(logits, tuple(x.shape[-2:]), align), feat


def nll(logp_BKHW: torch.Tensor, label_BHW: torch.Tensor) -> torch.Tensor:
    """Per-pixel cross-entropy from log-probabilities; 0 on ignored pixels (one log_softmax serves two labels)."""
    valid = label_BHW != IGNORE_LABEL
    idx = torch.where(valid, label_BHW, 0).long().unsqueeze(1)
    return -logp_BKHW.gather(1, idx).squeeze(1) * valid


def source_ce(logits_BKHW: torch.Tensor, label_BHW: torch.Tensor) -> torch.Tensor:
    """L_src: mean CE over the valid pixels, 0 when there is none (as the authors' CrossEntropy2d), with no host
    branch: the sum over at least one pixel."""
    total = F.cross_entropy(logits_BKHW, label_BHW, ignore_index=IGNORE_LABEL, reduction="sum")
    return total / (label_BHW != IGNORE_LABEL).sum().clamp(min=1)


@dataclasses.dataclass(frozen=True)
class Ranks:
    """The collectives that make one rank's step the step of the global batch (several ranks; engine/distributed.py).
    world_size scales each rank's loss so that DDP's mean of the gradients is the global loss's gradient; `sum`
    all-reduces (sums) a tensor that needs no gradient (q's and L_src's pixel counts); `gather_rows` all-gathers the
    pooled MMD vectors with autograd."""

    world_size: int
    sum: Callable[[torch.Tensor], torch.Tensor]
    gather_rows: Callable[[torch.Tensor], torch.Tensor]


def batched_student(cfg: Config) -> bool:
    """Step 5 as one student call over 3B images, 2B without dsp.source_mix (fast.batched_student; DSP only): its BN
    layers must then take statistics per group of B images (engine/batchnorm.py), or the result is not the separate
    calls'."""
    return cfg.fast.batched_student and cfg.dsp.enabled


@dataclasses.dataclass
class Mixed:
    """Steps 1-4's results: what the student trains on, and what an image grid shows."""

    x_m: torch.Tensor  # template after the long-tail pastes (B, 3, H, W)
    mask: torch.Tensor  # M (B, H, W) bool: the paste mask
    weight_mask: torch.Tensor  # where W = 1 in L_tgtmix (M, but with dsp.share_first_mask)
    mmd_mask: torch.Tensor  # the masked MMD's mask (M, but with dsp.share_first_mask)
    xs_mix: torch.Tensor  # mixed source images, strongly augmented with dsp.source_mix (else not trained on)
    ys_mix: torch.Tensor
    xt_mix: torch.Tensor  # strongly augmented mixed target images
    yt_mix: torch.Tensor
    yhat_t: torch.Tensor  # teacher pseudo-labels (B, H, W)
    q: torch.Tensor  # 0-d fraction of confident target pixels


def dsp_mix(cfg: Config, teacher, normalize, x_s, y_s, x_m, y_m, x_t, ch: DeviceChoices, *,
            ranks: Ranks | None = None) -> Mixed:
    """Steps 1-4 on the device: pseudo-labels, class selection, long-tail paste, dual soft paste, augmentation.
    With dsp.template 'source' the caller passes x_s, y_s as x_m, y_m (DACS's ClassMix of the source batch)."""
    d, num_classes = cfg.dsp, cfg.model.num_classes
    with torch.no_grad():
        prob = torch.softmax(seg_forward(teacher, x_t, normalize)[0].float(), dim=1)
        conf, yhat_t = prob.max(dim=1)
        if ranks is None:
            q = (conf >= d.conf_threshold).float().mean()
        else:  # q over the global batch: one all-reduce of [confident pixels, pixels]
            confident = (conf >= d.conf_threshold).sum().float()
            # full_like, not new_tensor: a fill kernel, where new_tensor would copy from the host (no graph capture)
            counts = ranks.sum(torch.stack([confident, torch.full_like(confident, conf.numel())]))
            q = counts[0] / counts[1]
    class_sel = select_classes(y_m, ch.class_u, num_classes)  # on the template's own labels, before step 3
    columns = d.long_tail_paste == "columns"
    x_m_pasted, y_m_pasted, pasted = paste_long_tail(x_m, y_m, ch.lt_img, ch.lt_label, ch.lt_cls, columns)
    weight_mask = mmd_mask = None
    if columns or d.share_first_mask or d.paste_ignore_label:
        # M from the template's labels before the paste (the column paste overwrites pixels outside M), handed to
        # the kernel as its `pasted` input with no class chosen, so that the kernel's mask is exactly M
        if not d.paste_ignore_label:
            class_sel = torch.cat([class_sel, torch.zeros_like(class_sel[:, :1])], dim=1)  # the ignore column
        pasted, weight_mask, mmd_mask = script_masks(class_mask(y_m, class_sel), pasted, d.share_first_mask)
        class_sel = torch.zeros_like(class_sel[:, :num_classes])
    xs_mix, ys_mix, xt_mix, yt_mix, mask = dual_soft_paste(x_m_pasted, y_m_pasted, class_sel, x_s, y_s, x_t, yhat_t,
                                                           d.lam, pasted)
    kernel = blur_kernel_shape(*x_s.shape[-2:])
    if d.source_mix:  # both mixed batches in one call: each image keeps its own draws, with half the operators
        both = strong_augment(torch.cat([xs_mix, xt_mix]), torch.cat([ch.aug_src, ch.aug_tgt]), kernel,
                              d.kornia_hsv_quirk)
        xs_mix, xt_mix = both.chunk(2)
    else:
        xt_mix = strong_augment(xt_mix, ch.aug_tgt, kernel, d.kornia_hsv_quirk)
    weight_mask, mmd_mask = (mask, mask) if weight_mask is None else (weight_mask, mmd_mask)
    return Mixed(x_m_pasted, mask, weight_mask, mmd_mask, xs_mix, ys_mix, xt_mix, yt_mix, yhat_t, q)


def dsp_losses(cfg: Config, student, teacher, normalize, x_s, y_s, x_m, y_m, x_t, ch: DeviceChoices, *,
               ranks: Ranks | None = None) -> dict[str, torch.Tensor]:
    """Steps 1-6 on the device: {"loss": the sum of the terms, each term, "q"}, every entry a 0-d tensor (no .item()).
    The trainer logs the mean of every entry over the steps between two log lines, under its key."""
    if not cfg.dsp.enabled:
        l_src = source_loss(seg_forward(student, x_s, normalize)[0], y_s, cfg.dsp, ranks=ranks)
        return {"loss": l_src, "src": l_src}
    d, lam = cfg.dsp, cfg.dsp.lam
    # step 5: the student on x_s, xs_mix (dsp.source_mix only) and xt_mix; as one call over the groups with the
    # batched student (the mixing first), else as separate calls in that order
    if batched_student(cfg):
        mix = dsp_mix(cfg, teacher, normalize, x_s, y_s, x_m, y_m, x_t, ch, ranks=ranks)
        groups = [x_s, mix.xs_mix, mix.xt_mix] if d.source_mix else [x_s, mix.xt_mix]
        logits, feat = seg_forward(student, torch.cat(groups), normalize)
        outs = list(zip(logits.chunk(len(groups)), feat.chunk(len(groups))))
    else:
        outs = [seg_forward(student, x_s, normalize)]
        mix = dsp_mix(cfg, teacher, normalize, x_s, y_s, x_m, y_m, x_t, ch, ranks=ranks)
        outs += [seg_forward(student, x, normalize) for x in ([mix.xs_mix] if d.source_mix else []) + [mix.xt_mix]]
    (logits_s, _), (logits_tm, feat_tm) = outs[0], outs[-1]
    terms = {"src": source_loss(logits_s, y_s, d, ranks=ranks)}
    # the losses and the MMD in fp32 whatever the run's autocast: a .float() alone is not enough, autocast would
    # cast the MMD's pooling matmul back to bf16. The (1-lam) terms are skipped at lam 1 (a hard paste): they are 0
    with torch.autocast(x_s.device.type, enabled=False):
        # the mixed losses' mean runs over all B*H*W pixels; every rank holds the same number, so a rank's own mean
        # is its share of the global mean times world_size, which DDP's mean over ranks divides back out
        if d.source_mix:
            logits_sm, feat_sm = outs[1]
            logp_sm = torch.log_softmax(logits_sm.float(), dim=1)
            src = lam * nll(logp_sm, mix.ys_mix)
            terms["srcmix"] = (src if lam == 1 else src + (1 - lam) * nll(logp_sm, y_s)).mean()
        logp_tm = torch.log_softmax(logits_tm.float(), dim=1)
        weight = torch.where(mix.weight_mask, 1.0, mix.q)
        tgt = lam * nll(logp_tm, mix.yt_mix)
        if lam != 1 and not d.drop_target_soft_term:
            tgt = tgt + (1 - lam) * nll(logp_tm, mix.yhat_t)
        terms["tgtmix"] = (weight * tgt).mean()
        if d.mmd_weight:  # 0: no MMD term at all (its projection then takes no gradient: engine/trainer.py)
            terms["mmd"] = mmd_term(d, feat_sm, feat_tm, mix.mmd_mask, tuple(x_s.shape[-2:]), ranks=ranks)
    # a new term: terms["name"] = value (a 0-d tensor); it joins the loss and the logs
    loss = sum(terms.values())
    return {"loss": loss, **terms, "q": mix.q}


def source_loss(logits_s: torch.Tensor, y_s: torch.Tensor, d: DSPConfig, *, ranks: Ranks | None = None
                ) -> torch.Tensor:
    """L_src: CE over the valid pixels (dsp.source_ce_mean 'valid'). Several ranks: the sum over this rank's pixels
    divided by the global valid count, times world_size (DDP averages the gradients over ranks); 0 when no pixel of
    the global batch is valid. 'all' (DAFormer's): over every pixel, of which every rank holds as many, so a rank's
    own mean is its share, as for the mixed losses."""
    if d.source_ce_mean == "all":
        return F.cross_entropy(logits_s.float(), y_s, ignore_index=IGNORE_LABEL, reduction="sum") / y_s.numel()
    if ranks is None:
        return source_ce(logits_s.float(), y_s)
    total = F.cross_entropy(logits_s.float(), y_s, ignore_index=IGNORE_LABEL, reduction="sum")
    valid = ranks.sum((y_s != IGNORE_LABEL).sum().float())
    return total * ranks.world_size / valid.clamp(min=1.0)


def mmd_term(d: DSPConfig, feat_s: torch.Tensor, feat_t: torch.Tensor, mask_BHW: torch.Tensor,
             size: tuple[int, int], *, ranks: Ranks | None = None) -> torch.Tensor:
    """Step 6's c * weighted MMD, in fp32 even inside an autocast region (the MMD stays fp32)."""
    with torch.autocast(feat_s.device.type, enabled=False):
        return d.mmd_weight * weighted_mmd(feat_s.float(), feat_t.float(), mask_BHW, size, d.mmd_kernel_mul,
                                           d.mmd_kernel_num, None if ranks is None else ranks.gather_rows)


@torch.no_grad()
def ema_update(teacher_params: list[torch.Tensor], student_params: list[torch.Tensor], step_t: torch.Tensor,
               ema_max: float, skip: torch.Tensor | None = None) -> None:
    """Step 7 with the step as a device tensor: g += (1 - alpha_t) * (f - g), alpha_t = min(1 - 1/(t+1), ema_max).

    `skip` (0-d, 1.0 on a skipped step) zeroes the weight on the device: a zero weight leaves the teacher as it
    was, with no host branch."""
    alpha = torch.clamp(1.0 - 1.0 / (step_t.float() + 1.0), max=ema_max)
    weight = 1.0 - alpha if skip is None else (1.0 - alpha) * (1.0 - skip)
    # not _foreach_lerp_: it has no overload taking a tensor weight, so torch would read the weight on the host
    # (a sync that makes the step uncapturable); _foreach_mul_ has a tensor overload and stays on the device
    diffs = torch._foreach_sub(student_params, teacher_params)
    torch._foreach_mul_(diffs, weight)
    torch._foreach_add_(teacher_params, diffs)
