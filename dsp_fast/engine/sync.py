"""What makes N ranks compute the step of one rank on the global batch: batch norm over the global batch, and the
collectives the DSP losses call (a sum over ranks for q and the pixel counts, an autograd-aware all-gather of the
pooled MMD vectors). All of them are plain collectives on device tensors: no host read, so the step still captures.

On CUDA the BN layers become torch.nn.SyncBatchNorm (its fused kernels save memory, and it skips its one host sync
while a CUDA graph is captured). torch's refuses CPU tensors, so elsewhere, and in the 2-rank gloo test that shows
the N-rank step equals the one-rank step, they become GlobalBatchNorm2d, the same statistics in plain PyTorch
(which keeps a few fp32 copies of each BN input for autograd: fine on CPU, the reason not to use it on GPUs). It
works on any backend: each rank computes
its per-channel mean and biased variance, one autograd-aware all-gather shares them, and the global statistics are
combined exactly (every rank holds the same number of pixels: the global batch splits evenly, see
`per_rank_batch`). Its backward is autograd's through the gather (a sum of every rank's gradients).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from dsp_fast.config import ConfigError


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """data.batch_size is the global batch per domain per step: each of the N ranks takes batch_size / N."""
    if batch_size % world_size:
        raise ConfigError(f"config field 'data.batch_size': the global batch {batch_size} does not split evenly over "
                          f"{world_size} ranks; use a multiple of {world_size}")
    return batch_size // world_size


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics cover every rank's batch (eval mode: as BatchNorm2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return super().forward(x)
        xf = x.float()
        # local mean and biased variance, then the exact combination over equal-sized shards
        var_l, mean_l = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
        stats_R2C = all_gather_autograd(torch.stack([mean_l, var_l])).unflatten(0, (-1, 2))
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
    """Replace every 2-d BN layer in place by one with statistics over all ranks, holding the same parameters and
    buffers (the optimizer's and the checkpoint's tensors stay the same objects, the state_dict keys the same):
    torch.nn.SyncBatchNorm on CUDA, GlobalBatchNorm2d elsewhere. `model` itself must not be a BN layer."""
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


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a tensor that needs no gradient (pixel counts): one all-reduce, on the device."""
    out = t.clone()
    dist.all_reduce(out)
    return out


def all_gather_autograd(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` concatenated along dim 0 in rank order, differentiable: the backward hands each rank the
    sum over ranks of the gradients of its own rows (a reduce-scatter), as torch.distributed.nn.functional's
    all_gather did; torch 2.13 deprecates that one (a FutureWarning on every rank) for this functional collective."""
    return funcol.all_gather_single_autograd(t.contiguous(), 0, dist.group.WORLD)


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, concatenated along dim 0 in rank order; gradients flow back to each rank's own rows."""
    return all_gather_autograd(t)
