"""Every random decision of one reference step, drawn on the host before the step (steps 2, 3 and 4's choices), so
that two implementations of the step can be fed the same ones."""

from __future__ import annotations

import dataclasses

import torch

from dsp_fast.config import Config
from dsp_fast.data import IGNORE_LABEL
from dsp_fast.reference.data import LongTailSource
from dsp_fast.reference.strong_aug import StrongAug, draw_step_aug


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


def draw_choices(cfg: Config, y_m: torch.Tensor, long_tail: LongTailSource | None, gen: torch.Generator
                 ) -> StepChoices:
    """The step's choices; `long_tail` None (dsp.num_long_tail 0): no long-tail draw at all."""
    d = cfg.dsp
    class_sel = select_classes(y_m, cfg.model.num_classes, d.paste_ignore_label, gen)
    # step 3: the classes once per step, as the script; then each template image its own crops
    classes = []
    if long_tail is not None:
        candidates = [c for c in d.long_tail_classes if long_tail.class_index[c]]  # a class no image holds: skipped
        classes = [candidates[p] for p in torch.randperm(len(candidates), generator=gen)[: d.num_long_tail].tolist()]
    crops = []
    for _ in range(len(y_m)):
        drawn = [(cls, long_tail.draw(cls, d.long_tail_search, gen)) for cls in classes]
        crops.append([(cls, *crop) for cls, crop in drawn if crop is not None])
    (crop_w, crop_h) = cfg.data.crop_size
    aug_src, aug_tgt = draw_step_aug(len(y_m), (crop_h, crop_w), d.jitter_p, d.jitter_strength, d.blur_p, gen)
    return StepChoices(class_sel, crops, aug_src, aug_tgt)
