"""Batch norm with training-mode statistics per group of images, so that the student's three forwards of a DSP step
(source, mixed source, mixed target: B images each) can run as one forward over 3B images with the results of
three calls.

A BN layer in training mode normalises with the statistics of the batch it is called on, and the authors' step
calls the student three times (docs/method.md, step 5), so each third of the batch has its own statistics. A
per-group layer splits its input into groups of `group_size` images along the batch dimension and runs its own
class's forward on each in turn: the same kernel on the same images (native BN, cuDNN on CUDA), the running
statistics updated group by group in call order exactly as three calls update them, and, with several ranks,
each group's statistics reduced over ranks by the layer's own collective (SyncBatchNorm on CUDA,
GlobalBatchNorm2d elsewhere) as three calls reduce them. What it adds: one concatenation of the groups' outputs per
layer, forward and backward (`split`'s backward is one concatenation too; slicing's would allocate a full-size
zero tensor per group). What it saves: two of every three launches of every other operator of the student's
forward and backward, and the convolutions run at 3B (a better-shaped GEMM).

In eval mode (`model.freeze_bn`, evaluation) BN is a per-image affine map and no split is needed. A call with at
most `group_size` images (the teacher's, an image grid's) is a plain BN call.

The layers are converted in place by changing their class (parameters, buffers and state_dict keys stay the same
objects, so the optimizer, the EMA and checkpoints see no difference).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from dsp_fast.engine.sync import GlobalBatchNorm2d
from dsp_fast.models import unwrap


class PerGroupStats:
    """Mixin placed before a BN class: in training mode, statistics per group of `group_size` images."""

    group_size: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.group_size
        if not self.training or n <= 0 or x.shape[0] <= n:
            return super().forward(x)
        if x.shape[0] % n:
            raise ValueError(f"{type(self).__name__}: a batch of {x.shape[0]} images does not split into groups of "
                             f"{n}")
        outs = []
        for part in x.split(n):  # in order: the running statistics move as the separate calls move them
            outs.append(super().forward(part))
        return torch.cat(outs)


class PerGroupBatchNorm2d(PerGroupStats, nn.BatchNorm2d):
    pass


class PerGroupGlobalBatchNorm2d(PerGroupStats, GlobalBatchNorm2d):
    pass


class PerGroupSyncBatchNorm(PerGroupStats, nn.SyncBatchNorm):
    pass


_PER_GROUP = {nn.BatchNorm2d: PerGroupBatchNorm2d, GlobalBatchNorm2d: PerGroupGlobalBatchNorm2d,
              nn.SyncBatchNorm: PerGroupSyncBatchNorm}


def apply_group_bn(model: nn.Module, group_size: int) -> nn.Module:
    """Give every BN layer of `model` statistics per group of `group_size` images (in place; apply after
    engine.sync.convert_global_bn, whose layer classes it knows). Returns `model`."""
    for name, m in model.named_modules():
        if not isinstance(m, _BatchNorm):
            continue
        if not isinstance(m, PerGroupStats):
            per_group = _PER_GROUP.get(type(m))
            if per_group is None:
                raise TypeError(f"{name}: {type(m).__name__} has no per-group version (BatchNorm2d, "
                                "GlobalBatchNorm2d and SyncBatchNorm have)")
            m.__class__ = per_group
        m.group_size = group_size
    return model


def check_group_bn(model: nn.Module) -> None:
    """Refuse a batched student whose BN layers would take one set of statistics over all three groups (a silent
    change of the method): every BN layer must be per-group (`apply_group_bn`)."""
    inner = unwrap(model)  # a DDP wrapper
    plain = [name for name, m in inner.named_modules()
             if isinstance(m, _BatchNorm) and not (isinstance(m, PerGroupStats) and m.group_size > 0)]
    if plain:
        raise ValueError(f"batched student forward (fast.batched_student): {len(plain)} BN layers take statistics "
                         f"over the whole call, e.g. {plain[0]!r}; apply engine.group_bn.apply_group_bn first")
