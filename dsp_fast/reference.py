"""The naive DSP reference trainer: plain eager PyTorch (fp32, NCHW, a PIL DataLoader), to be read beside the paper.

It is the correctness oracle of the fast trainer and the baseline of the throughput comparison: correct, not
deliberately slow, and independent of the fast path (it uses only the kernels' plain-PyTorch twins).
Step numbers in comments refer to docs/method.md.

    python -m dsp_fast.reference [--config synthetic|gta2cs|synthia2cs|FILE.yaml] [section.field=value ...]

Image tensors are RGB floats in 0..1 until `normalize_input` right before the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from dsp_fast.augment import StrongAug, draw_step_aug, strong_augment
from dsp_fast.config import Config, ConfigError, load_config, split_overrides
from dsp_fast.data import (
    IGNORE_LABEL,
    SOURCE_RESAMPLE,
    DatasetError,
    load_or_build_class_index,
    resize_image,
    resize_label,
)
from dsp_fast.data.build import check_data, source_dataset, target_dataset
from dsp_fast.data.windows import valid_windows
from dsp_fast.evaluate import evaluate, format_iou_table, iou_from_confusion, mean_iou, target_iou
from dsp_fast.kernels.twins import weighted_mmd
from dsp_fast.models import build_student_teacher, normalize_input, param_groups
from dsp_fast.run_io import (
    RunLog,
    format_final_report,
    format_final_table,
    new_run_dir,
    resolve_device,
    save_checkpoint,
    write_provenance,
    write_summary,
)


# ----------------------------------------------------------------------------------------------- data
def random_window(height: int, width: int, crop_w: int, crop_h: int, gen: torch.Generator | None = None
                  ) -> tuple[int, int]:
    """Top-left corner (y0, x0) of a uniformly random crop window."""
    y0 = int(torch.randint(0, height - crop_h + 1, (1,), generator=gen))
    x0 = int(torch.randint(0, width - crop_w + 1, (1,), generator=gen))
    return y0, x0


def to_tensor(image_uint8_HWC: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image_uint8_HWC)).permute(2, 0, 1).float().div(255)


class RandomCrops(Dataset):
    """Resize to the domain's base size (as the authors do: bicubic for the labelled source, bilinear for
    Cityscapes), then one random crop; labels never interpolated."""

    def __init__(self, dataset, base_size: tuple[int, int], crop_size: tuple[int, int], resample: str = "bilinear"):
        self.dataset, self.base_size, self.crop_size, self.resample = dataset, base_size, crop_size, resample

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label = self.dataset[i]
        image = resize_image(image, self.base_size, self.resample)
        (cw, ch), (w, h) = self.crop_size, self.base_size
        y0, x0 = random_window(h, w, cw, ch)
        crop = to_tensor(image[y0:y0 + ch, x0:x0 + cw])
        if label is None:
            return crop
        label = resize_label(label, self.base_size)
        return crop, torch.from_numpy(label[y0:y0 + ch, x0:x0 + cw].astype(np.int64))


def forever(loader: DataLoader):
    while True:
        yield from loader


class LongTailSource:
    """Step 3's crops: a source image resized to the long-tail size (bicubic image, nearest label, as the authors'
    rand_mixer), cut by a crop-sized window that holds the class.

    'retry' is the authors' loop literally: redraw (image of the class's list, uniform window) until the window holds
    the class, at most 1000 times (None when it never does). 'counts' draws from the same distribution without the
    loop: the image in proportion to its number of windows that hold the class (counted once per class, on first
    use, from every label of the class's list), then one of those windows uniformly.
    """

    def __init__(self, dataset, class_index: list[list[int]], size: tuple[int, int], crop: tuple[int, int]):
        self.dataset, self.class_index, self.size, self.crop = dataset, class_index, size, crop
        self._counts: dict[int, torch.Tensor] = {}

    @functools.lru_cache(maxsize=32)  # a few recent images (the retry loop redraws them); lives as long as the run
    def resized(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, label = self.dataset[index]
        return resize_image(image, self.size, SOURCE_RESAMPLE), resize_label(label, self.size)

    def window_counts(self, cls: int) -> torch.Tensor:
        """(len(class_index[cls]),) float64: valid windows of each image of the class's list."""
        if cls not in self._counts:
            counts = [valid_windows(resize_label(self.dataset.read_label(i), self.size), cls, self.crop).sum()
                      for i in self.class_index[cls]]
            self._counts[cls] = torch.tensor(counts, dtype=torch.float64)
        return self._counts[cls]

    def draw(self, cls: int, mode: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(image 3xHxW in 0..1, label HxW) of one crop holding `cls`, or None when the class cannot be found."""
        images = self.class_index[cls]
        (cw, ch), (w, h) = self.crop, self.size
        if mode == "retry":
            for _ in range(1000):
                image, label = self.resized(images[int(torch.randint(0, len(images), (1,), generator=gen))])
                y0, x0 = random_window(h, w, cw, ch, gen)
                if (label[y0:y0 + ch, x0:x0 + cw] == cls).any():
                    break
            else:
                return None
        else:
            counts = self.window_counts(cls)
            if counts.sum() == 0:
                return None
            image, label = self.resized(images[int(torch.multinomial(counts, 1, generator=gen))])
            valid = np.flatnonzero(valid_windows(label, cls, self.crop))
            y0, x0 = divmod(int(valid[int(torch.randint(0, len(valid), (1,), generator=gen))]), w - cw + 1)
        crop_label = torch.from_numpy(label[y0:y0 + ch, x0:x0 + cw].astype(np.int64))
        return to_tensor(image[y0:y0 + ch, x0:x0 + cw]), crop_label


# ----------------------------------------------------------------------------------------------- random choices
@dataclasses.dataclass
class StepChoices:
    """Every random decision of one DSP step, drawn before the step so two implementations can share them."""

    class_sel: torch.Tensor  # (B, K+1) bool: classes chosen per template image; column K is the ignore label
    long_tail: list[list[tuple[int, torch.Tensor, torch.Tensor]]]  # per template image: (class, 3xHxW, HxW) crops
    aug_src: StrongAug  # strong augmentation of the mixed source images
    aug_tgt: StrongAug  # strong augmentation of the mixed target images


def select_classes(y_m: torch.Tensor, num_classes: int, paste_ignore_label: bool, gen: torch.Generator) -> torch.Tensor:
    """Step 2 (ClassMix): per template image, half (rounded up) of the classes present, chosen at random."""
    sel = torch.zeros(len(y_m), num_classes + 1, dtype=torch.bool)
    for i, labels in enumerate(y_m):
        classes = torch.unique(labels)
        if not paste_ignore_label:
            classes = classes[classes != IGNORE_LABEL]
        chosen = classes[torch.randperm(len(classes), generator=gen)[: (len(classes) + 1) // 2]]
        chosen[chosen == IGNORE_LABEL] = num_classes  # the ignore label's own column
        sel[i, chosen] = True
    return sel


def draw_choices(cfg: Config, y_m: torch.Tensor, long_tail: LongTailSource, gen: torch.Generator) -> StepChoices:
    d = cfg.dsp
    class_sel = select_classes(y_m, cfg.model.num_classes, d.paste_ignore_label, gen)
    # step 3: the classes once per step, as the script; then each template image its own crops
    candidates = [c for c in d.long_tail_classes if long_tail.class_index[c]]  # a class no image holds is skipped
    classes = [candidates[p] for p in torch.randperm(len(candidates), generator=gen)[: d.num_long_tail].tolist()]
    crops = []
    for _ in range(len(y_m)):
        drawn = [(cls, long_tail.draw(cls, d.long_tail_search, gen)) for cls in classes]
        crops.append([(cls, *crop) for cls, crop in drawn if crop is not None])
    (crop_w, crop_h) = cfg.data.crop_size
    aug_src, aug_tgt = draw_step_aug(len(y_m), (crop_h, crop_w), d.jitter_p, d.jitter_strength, d.blur_p, gen)
    return StepChoices(class_sel, crops, aug_src, aug_tgt)


# ----------------------------------------------------------------------------------------------- the step
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
    (chosen_0 | every image's pasted pixels); the other images' weights use their own chosen classes only.
    """
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


def source_loss(logits, y_s):
    """L_src: mean CE over the valid pixels; 0 when there is none (as the authors' CrossEntropy2d)."""
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
    l_src = source_loss(logits_s, y_s)
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
    # 4. dual soft paste + strong augmentation
    xs_mix, ys_mix, xt_mix, yt_mix = soft_paste(cfg, x_s, y_s, x_m, y_m, x_t, yhat_t, mix_mask)
    xs_mix = strong_augment(xs_mix, choices.aug_src, d.kornia_hsv_quirk)
    xt_mix = strong_augment(xt_mix, choices.aug_tgt, d.kornia_hsv_quirk)
    # 5. student forwards (separate calls: BN batch statistics differ per call)
    logits_sm, feat_sm = seg_forward(student, xs_mix)
    logits_tm, feat_tm = seg_forward(student, xt_mix)
    # 6. losses; an ignored pixel contributes 0 but still counts in the mean over B*H*W
    l_srcmix = (lam * ce(logits_sm, ys_mix) + (1 - lam) * ce(logits_sm, y_s)).mean()
    weight = torch.where(weight_mask, torch.ones_like(conf), q)
    tgt_terms = lam * weight * ce(logits_tm, yt_mix)
    if not d.drop_target_soft_term:
        tgt_terms = tgt_terms + (1 - lam) * weight * ce(logits_tm, yhat_t)
    l_tgtmix = tgt_terms.mean()
    l_mmd = d.mmd_weight * weighted_mmd(feat_sm, feat_tm, mmd_mask, tuple(x_s.shape[-2:]))
    loss = l_src + l_srcmix + l_tgtmix + l_mmd
    return {"loss": loss, "src": l_src, "srcmix": l_srcmix, "tgtmix": l_tgtmix, "mmd": l_mmd, "q": q}


def poly_lr(cfg: Config, step: int) -> float:
    """Poly decay of the base lr; over the first optim.warmup_steps it ramps linearly from warmup_ratio x that
    value up to it (mmcv's 'linear' warm-up, as DAFormer's schedule)."""
    o = cfg.optim
    lr = o.lr * (1 - step / cfg.train.max_steps) ** o.poly_power
    if step < o.warmup_steps:
        progress = step / o.warmup_steps
        lr = lr * (o.warmup_ratio + (1 - o.warmup_ratio) * progress)
    return lr


def build_optimizer(cfg: Config, student: torch.nn.Module) -> torch.optim.Optimizer:
    """Plain torch SGD (DSP) or AdamW (DAFormer's recipe for MiT) over the model's parameter groups; with
    optim.script_param_repeats, the authors' SGD: the backbone group listed as their generator lists it."""
    o = cfg.optim
    groups = param_groups(student, o.lr, o.head_lr_mult, cfg.dsp.train_mmd_projection, o.weight_decay,
                          o.norm_decay_mult)
    if o.algorithm == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    if o.script_param_repeats:
        backbone = groups[0]
        listed = list(get_1x_lr_params_NOscale(student))
        assert backbone["name"] == "backbone" and {id(p) for p in listed} == {id(p) for p in backbone["params"]}
        backbone["params"] = listed
        return Torch171SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def get_1x_lr_params_NOscale(model: torch.nn.Module) -> Iterator[torch.nn.Parameter]:
    """The authors' backbone generator (named as theirs): each module under the stem and layer1..4 yields all the
    parameters below it, so a parameter comes once per module that holds it (a bottleneck conv 3 times)."""
    for root in (model.conv1, model.bn1, model.layer1, model.layer2, model.layer3, model.layer4):
        for module in root.modules():
            for p in module.parameters():
                if p.requires_grad:
                    yield p


class Torch171SGD(torch.optim.Optimizer):
    """SGD as torch 1.7.1 ran it: every entry of a group is stepped in turn, so a parameter listed k times takes k
    updates with its gradient fixed (weight decay from the parameter as it is then, one momentum buffer)."""

    def __init__(self, groups, lr: float, momentum: float, weight_decay: float):
        with warnings.catch_warnings():  # torch warns about the repeated entries: they are the point here
            warnings.filterwarnings("ignore", message="optimizer contains a parameter group with duplicate")
            super().__init__(groups, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad.add(p, alpha=group["weight_decay"])  # torch 1.7.1's own expressions, same roundings
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d_p.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d_p)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])


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


# ----------------------------------------------------------------------------------------------- the run
@dataclasses.dataclass
class ReferenceRun:
    """What a reference run holds between steps: data streams, the two models, the optimizer, the choice RNG."""

    cfg: Config
    device: torch.device
    source: Dataset
    class_index: list[list[int]]
    gen: torch.Generator
    src_iter: Iterator
    tmpl_iter: Iterator
    tgt_iter: Iterator
    student: torch.nn.Module
    teacher: torch.nn.Module
    optimizer: torch.optim.Optimizer
    long_tail: LongTailSource | None = None  # step 3's crops (set by build_run)


def build_run(cfg: Config) -> ReferenceRun:
    torch.manual_seed(cfg.train.seed)
    gen = torch.Generator().manual_seed(cfg.train.seed + 1)
    device = resolve_device(cfg.train.device)
    source = source_dataset(cfg)
    target = target_dataset(cfg, "train", labels=False)
    class_index = load_or_build_class_index(source, cfg.model.num_classes)
    d = cfg.data

    def loader(dataset, base_size, seed):
        resample = SOURCE_RESAMPLE if dataset is source else "bilinear"
        return forever(DataLoader(RandomCrops(dataset, base_size, d.crop_size, resample), batch_size=d.batch_size,
                                  shuffle=True, drop_last=True, num_workers=d.num_workers,
                                  generator=torch.Generator().manual_seed(seed)))

    src_iter = loader(source, d.source_size, cfg.train.seed + 10)
    tmpl_iter = loader(source, d.source_size, cfg.train.seed + 20)  # a second, independently shuffled source stream
    tgt_iter = loader(target, d.target_size, cfg.train.seed + 30)
    student, teacher = build_student_teacher(cfg.model, device)
    optimizer = build_optimizer(cfg, student)
    long_tail = LongTailSource(source, class_index, cfg.dsp.long_tail_size, d.crop_size)
    return ReferenceRun(cfg, device, source, class_index, gen, src_iter, tmpl_iter, tgt_iter, student, teacher,
                        optimizer, long_tail)


def next_batch(run: ReferenceRun) -> tuple[list[torch.Tensor], StepChoices]:
    """One step's data: source, template and target crops, and the step's random choices, on the device."""
    (x_s, y_s), (x_m, y_m), x_t = next(run.src_iter), next(run.tmpl_iter), next(run.tgt_iter)
    choices = draw_choices(run.cfg, y_m, run.long_tail, run.gen)
    if run.device.type != "cpu":
        choices.long_tail = [[(c, i.to(run.device), lb.to(run.device)) for c, i, lb in crops]
                             for crops in choices.long_tail]
        choices.class_sel = choices.class_sel.to(run.device)
    return [t.to(run.device) for t in (x_s, y_s, x_m, y_m, x_t)], choices


class BadInputStop(RuntimeError):
    """A data file failed mid-run: the run stopped after saving a checkpoint; the message names the file."""


def _dataset_error_text(e: Exception) -> str:
    """The message of a DatasetError, also when a DataLoader worker re-raised it wrapped in its traceback."""
    text = str(e)
    if "Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if last.startswith(("dsp_fast.", "DatasetError")) and ": " in last else last
    return text


def train(cfg: Config, log: RunLog) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The whole reference run; returns (student, teacher). A file that cannot be read stops the run with a
    checkpoint of the last finished step (BadInputStop)."""
    run = build_run(cfg)
    student, teacher, optimizer = run.student, run.teacher, run.optimizer
    # a source-only step reads and trains on the source batch alone
    log.start(cfg.train.max_steps, images_per_step=(3 if cfg.dsp.enabled else 1) * cfg.data.batch_size)
    for step in range(cfg.train.max_steps):
        t_data = time.perf_counter()
        try:
            batch, choices = next_batch(run)
        except DatasetError as e:
            path = log.path("last.pt")
            save_checkpoint(path, student, teacher, optimizer, step, cfg)
            raise BadInputStop(f"{_dataset_error_text(e)}\n1 unreadable file found at step {step} of "
                               f"{cfg.train.max_steps} (the reference trainer reads the original files as it trains, "
                               f"so it stops at the first; python -m dsp_fast.prepare lists them all in rejects.txt)."
                               f" The run stopped with a checkpoint of step {step}: {path}") from None
        data_s = time.perf_counter() - t_data
        losses = train_step(cfg, student, teacher, optimizer, step, batch, choices)
        if not math.isfinite(losses["loss"]):
            raise FloatingPointError(f"reference trainer: non-finite loss {losses} at step {step}")
        log.step(step + 1, losses, data_s=data_s)
        if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and step + 1 < cfg.train.max_steps:
            run_eval(cfg, student, log, step + 1)
        if cfg.train.checkpoint_every and (step + 1) % cfg.train.checkpoint_every == 0:
            save_checkpoint(log.path("last.pt"), student, teacher, optimizer, step + 1, cfg)
    save_checkpoint(log.path("last.pt"), student, teacher, optimizer, cfg.train.max_steps, cfg)
    return student, teacher


def run_eval(cfg: Config, model: torch.nn.Module, log: RunLog, step: int) -> torch.Tensor:
    """Target IoU of `model`, logged and returned."""
    device = next(model.parameters()).device
    dataset = target_dataset(cfg, cfg.data.eval_split, labels=True)
    iou = iou_from_confusion(evaluate(model, dataset, cfg.data.eval_size, cfg.model.num_classes, device,
                                      cfg.data.max_eval_images))
    log.metrics(step, {"eval/mIoU": mean_iou(iou)})
    return iou


def run(cfg: Config) -> dict[str, float]:
    """Check the data, train (and, with train.compare_source_only, a source-only twin run), evaluate, print the
    table; the run gets a new folder `<train.out_dir>/reference[_<n>]`, with summary.json at the end."""
    check_data(cfg)  # every root, split and layout now, not at the final evaluation
    runs = [("adapted (DSP)", cfg)]
    if cfg.train.compare_source_only and cfg.dsp.enabled:
        src_only = dataclasses.replace(cfg, dsp=dataclasses.replace(cfg.dsp, enabled=False))
        runs.insert(0, ("source-only", src_only))
    results = {}
    t0 = time.time()
    # under <out_dir>/reference: the fast trainer owns <out_dir> itself
    top = new_run_dir(os.path.join(cfg.train.out_dir, "reference"))
    print(f"run folder: {os.path.abspath(top)}", flush=True)
    write_provenance(top, resolve_device(cfg.train.device))
    summary: dict = {"run_dir": os.path.abspath(top), "models": {}}
    for name, run_cfg in runs:
        leaf = ("source_only" if not run_cfg.dsp.enabled else "dsp") if len(runs) > 1 else ""
        log = RunLog(run_cfg, os.path.join(top, leaf) if leaf else top, title=f"reference {name}")
        try:
            student, teacher = train(run_cfg, log)
            iou, teacher_iou = run_eval(run_cfg, student, log, run_cfg.train.max_steps), target_iou(run_cfg, teacher)
            print(format_final_report(name, run_cfg.train.max_steps, iou, teacher_iou, format_iou_table(iou)))
            record = log.final(run_cfg.train.max_steps, iou, teacher_iou)
        finally:
            log.close()
        results[name] = mean_iou(iou)
        summary["models"][name] = {"folder": os.path.abspath(log.dir), "steps": run_cfg.train.max_steps, **record}
    print(format_final_table(summary["models"], cfg.model.num_classes))
    summary["total_s"] = round(time.time() - t0, 1)
    print(f"total time {time.time() - t0:.0f} s")
    print(f"run folder: {os.path.abspath(top)} (summary: {os.path.abspath(write_summary(top, summary))})")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsp_fast.reference", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="synthetic", help="preset name (synthetic, gta2cs, synthia2cs) or YAML")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. train.max_steps=100")
    flags, overrides = split_overrides(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(flags)
    args.overrides = [*args.overrides, *overrides]
    try:
        run(load_config(args.config, args.overrides))
    except (ConfigError, DatasetError, BadInputStop) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
