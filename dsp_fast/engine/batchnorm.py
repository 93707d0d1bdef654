"""Batch norm as the fast step needs it: statistics over every rank's images, and statistics per group of images
(docs/method.md, "Batch norm and input normalisation"; docs/distributed.md).

Over ranks: torch.nn.SyncBatchNorm on CUDA. Torch's refuses CPU tensors, so elsewhere (and in the 2-rank gloo test)
GlobalBatchNorm2d computes the same statistics in plain PyTorch; its autograd keeps fp32 copies of each BN input,
fine on CPU, the reason not to use it on GPUs. Every rank holds the same number of pixels
(`distributed.per_rank_batch`), so one autograd-aware all-gather of the per-rank means and biased variances
combines them exactly.

Per group (the batched student: step 5's three student calls as one forward over 3B images): a layer splits its
input into groups of `group_size` images and runs its own class's forward on each in turn, so each group has its
own statistics, the running statistics move group by group in call order and, with several ranks, each group is
reduced by the layer's own collective, as three calls do. It costs one concatenation per layer (`split`'s backward
is one too; slicing's would allocate a zero tensor per group) and saves two of three launches of every other
operator. Eval mode (`model.freeze_bn`, evaluation) and calls of at most `group_size` images are plain BN calls.

Layers are converted in place by changing their class: parameters, buffers and state_dict keys stay the same
objects, so the optimizer, the EMA and checkpoints see no difference.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from dsp_fast.engine.distributed import gather_rows
from dsp_fast.models import unwrap


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics cover every rank's batch (eval mode: as BatchNorm2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return super().forward(x)
        xf = x.float()
        # local mean and biased variance, then the exact combination over equal-sized shards
        var_l, mean_l = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
        stats_R2C = gather_rows(torch.stack([mean_l, var_l])).unflatten(0, (-1, 2))
        mean = stats_R2C[:, 0].mean(0)
        var = (stats_R2C[:, 1] + (stats_R2C[:, 0] - mean).pow(2)).mean(0)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            n = x.numel() // x.shape[1] * stats_R2C.shape[0]
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach() * (n / max(n - 1, 1)), self.momentum)
                self.num_batches_tracked.add_(1)
        shape = (1, -1, 1, 1)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_global_bn(model: nn.Module, device: torch.device | None = None) -> nn.Module:
    """Replace every 2-d BN layer in place by one with statistics over all ranks and the same parameters, buffers
    and keys: torch.nn.SyncBatchNorm on CUDA, GlobalBatchNorm2d elsewhere. `model` itself must not be a BN layer."""
    if device is not None and device.type == "cuda":
        # torch's converter replaces the children in place and keeps parameters and buffers
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, GlobalBatchNorm2d):
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats, device="meta")
            new.weight, new.bias = child.weight, child.bias
            for buf in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(new, buf, getattr(child, buf))
            new.train(child.training)
            setattr(model, name, new)
        elif isinstance(child, _BatchNorm) and not isinstance(child, nn.BatchNorm2d):
            raise TypeError(f"{name}: {type(child).__name__} has no global-batch version (only BatchNorm2d)")
        else:
            convert_global_bn(child)
    return model


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
        forward = super().forward  # group by group, in order: the running statistics move as separate calls move them
        return torch.cat([forward(part) for part in x.split(n)])


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
    convert_global_bn above, whose layer classes it knows). Returns `model`."""
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
                         f"over the whole call, e.g. {plain[0]!r}; apply engine.batchnorm.apply_group_bn first")
