"""One reference DSP step, readable beside the paper: steps 1-7 of docs/method.md in plain eager PyTorch (fp32).
Its only piece shared with the fast path is the MMD, the kernels' plain-PyTorch twin."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsp_fast.config import Config
from dsp_fast.data import IGNORE_LABEL
from dsp_fast.kernels.twins import weighted_mmd  # the one import of the kernels' twins in this package
from dsp_fast.models import normalize_input
from dsp_fast.reference.choices import StepChoices
from dsp_fast.reference.optim import poly_lr
from dsp_fast.reference.strong_aug import strong_augment


def seg_forward(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits upsampled to the input size (bilinear; align_corners=True for DeepLab as the DSP script, False for
    MiT + DAFormer as DAFormer's code: the model's `logits_align_corners`), and the model's MMD features."""
    logits, feat = model(normalize_input(x, model.input_kind))
    return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=model.logits_align_corners), feat


def ema_alpha(step: int, ema_max: float) -> float:
    """Step 7: alpha_t = min(1 - 1/(t+1), ema_max); t starts at 0, so the first update copies the student."""
    return min(1.0 - 1.0 / (step + 1), ema_max)


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, alpha: float) -> None:
    """g = alpha*g + (1-alpha)*f on parameters only (BN buffers are not averaged, as in the authors' code)."""
    for g, f in zip(teacher.parameters(), student.parameters()):
        g.mul_(alpha).add_(f, alpha=1 - alpha)


def class_mask(y_m: torch.Tensor, class_sel: torch.Tensor) -> torch.Tensor:
    """Step 2's mask: M_i = y_m[i] in the chosen classes (the ignore label is its own column K of class_sel)."""
    k = class_sel.shape[1] - 1
    return torch.stack([class_sel[i][torch.where(y_m[i] == IGNORE_LABEL, k, y_m[i])] for i in range(len(y_m))])


def paste_long_tail(x_m, y_m, long_tail, columns=False):
    """Step 3: hard-paste each template image's own crops (the crop's class pixels) onto it.

    columns (dsp.long_tail_paste 'columns'): as the script, whose oneMix takes mask[0], the first row of the crop's
    (H, W) class mask, and broadcasts it down every row: the crop's image and label go in whole columns.
    Returns (x_m, y_m, pasted): pasted (B, H, W) marks the class's pixels, which join M whatever their class."""
    x_m, y_m = x_m.clone(), y_m.clone()
    pasted = torch.zeros_like(y_m, dtype=torch.bool)
    for i, crops in enumerate(long_tail):
        for cls, lt_img, lt_label in crops:
            hit = lt_label == cls
            where = hit[0].expand(hit.shape[0], -1) if columns else hit
            x_m[i] = torch.where(where, lt_img, x_m[i])
            y_m[i] = torch.where(where, lt_label, y_m[i])
            pasted[i] |= hit
    return x_m, y_m, pasted


def step_masks(cfg: Config, chosen: torch.Tensor, pasted: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(paste mask, weight mask, MMD mask), each (B, H, W): all three are chosen | pasted.

    dsp.share_first_mask reproduces the script's bug: every image is mixed with image 0's mask tensor, which the
    long-tail paste of each image writes into (a view) before that image is mixed: image i is pasted with
    chosen_0 | pasted_0 | ... | pasted_i. Image 0's weights and the MMD of every image use that tensor at the end
    (chosen_0 | every image's pasted pixels); the other images' weights use their own chosen classes only."""
    mask = chosen | pasted
    if not cfg.dsp.share_first_mask:
        return mask, mask, mask
    shared = chosen[0] | pasted.cummax(dim=0).values  # row i: chosen_0 | pasted_0..i
    final = shared[-1]
    weight = torch.cat([final[None], chosen[1:]])
    return shared, weight, final.expand_as(mask)


def soft_paste(cfg: Config, x_s, y_s, x_m, y_m, x_t, yhat_t, mask):
    """Step 4: the same mask M pastes the template softly onto the source and the target images."""
    lam = cfg.dsp.lam
    m = mask[:, None].float()
    xs_mix = lam * m * x_m + (1 - lam * m) * x_s
    xt_mix = lam * m * x_m + (1 - lam * m) * x_t
    ys_mix = torch.where(mask, y_m, y_s)
    yt_mix = torch.where(mask, y_m, yhat_t)
    return xs_mix, ys_mix, xt_mix, yt_mix


def source_loss(logits, y_s, mean_over="valid"):
    """L_src: mean CE over the valid pixels; 0 when there is none (as the authors' CrossEntropy2d). mean_over 'all':
    DAFormer's mean, every pixel counted, an ignored one as 0 (dsp.source_ce_mean)."""
    if mean_over == "all":
        per_pixel = F.cross_entropy(logits, y_s, ignore_index=IGNORE_LABEL, reduction="none")
        return per_pixel.mean()
    n_valid = int((y_s != IGNORE_LABEL).sum())
    if n_valid == 0:
        return logits.sum() * 0.0  # keeps the graph, so backward runs as on any step
    return F.cross_entropy(logits, y_s, ignore_index=IGNORE_LABEL)


def dsp_losses(cfg: Config, student, teacher, x_s, y_s, x_m, y_m, x_t, choices: StepChoices
               ) -> dict[str, torch.Tensor]:
    """Steps 1-6 of one DSP step; returns every loss term (L is their sum) and the pseudo-label rate q."""
    d, lam = cfg.dsp, cfg.dsp.lam
    ce = torch.nn.CrossEntropyLoss(ignore_index=IGNORE_LABEL, reduction="none")
    logits_s, _ = seg_forward(student, x_s)
    l_src = source_loss(logits_s, y_s, d.source_ce_mean)
    if not d.enabled:
        return {"loss": l_src, "src": l_src}
    # 1. pseudo-labels from the teacher
    with torch.no_grad():
        prob = torch.softmax(seg_forward(teacher, x_t)[0], dim=1)
        conf, yhat_t = prob.max(dim=1)
        q = (conf >= d.conf_threshold).float().mean()
    # 2.-3. the chosen classes' mask (on the template's own labels), then the long-tail paste
    chosen = class_mask(y_m, choices.class_sel)
    x_m, y_m, pasted = paste_long_tail(x_m, y_m, choices.long_tail, d.long_tail_paste == "columns")
    mix_mask, weight_mask, mmd_mask = step_masks(cfg, chosen, pasted)
    # 4. dual soft paste + strong augmentation (the source mix only with dsp.source_mix)
    xs_mix, ys_mix, xt_mix, yt_mix = soft_paste(cfg, x_s, y_s, x_m, y_m, x_t, yhat_t, mix_mask)
    xt_mix = strong_augment(xt_mix, choices.aug_tgt, d.kornia_hsv_quirk)
    terms = {"src": l_src}
    # 5.-6. student forwards (separate calls: BN batch statistics differ per call) and the losses; an ignored pixel
    # contributes 0 but still counts in the mean over B*H*W
    if d.source_mix:
        xs_mix = strong_augment(xs_mix, choices.aug_src, d.kornia_hsv_quirk)
        logits_sm, feat_sm = seg_forward(student, xs_mix)
        terms["srcmix"] = (lam * ce(logits_sm, ys_mix) + (1 - lam) * ce(logits_sm, y_s)).mean()
    logits_tm, feat_tm = seg_forward(student, xt_mix)
    weight = torch.where(weight_mask, torch.ones_like(conf), q)
    tgt_terms = lam * weight * ce(logits_tm, yt_mix)
    if not d.drop_target_soft_term:
        tgt_terms = tgt_terms + (1 - lam) * weight * ce(logits_tm, yhat_t)
    terms["tgtmix"] = tgt_terms.mean()
    if d.mmd_weight > 0:  # 0: no MMD at all (dsp.source_mix false requires it)
        terms["mmd"] = d.mmd_weight * weighted_mmd(feat_sm, feat_tm, mmd_mask, tuple(x_s.shape[-2:]))
    return {"loss": sum(terms.values()), **terms, "q": q}


def train_step(cfg: Config, student, teacher, optimizer, step: int, batch, choices: StepChoices) -> dict[str, float]:
    """One optimizer step on L, then the EMA teacher update. Returns the loss terms as floats (research-code style)."""
    for group in optimizer.param_groups:
        group["lr"] = poly_lr(cfg, step) * group["lr_mult"]
    optimizer.zero_grad(set_to_none=True)
    losses = dsp_losses(cfg, student, teacher, *batch, choices)
    losses["loss"].backward()
    optimizer.step()
    ema_update(teacher, student, ema_alpha(step, cfg.dsp.ema_max))
    return {k: float(v.detach()) for k, v in losses.items()}
