"""DeepLabv2's batch-norm chains as fused kernels (`kernels.bn_act`): BN -> ReLU, and BN -> + identity -> ReLU at
the end of each bottleneck, one pass over memory each way instead of one per operator (docs/performance.md).

The bottlenecks and the stem are converted in place by changing their class, as engine/batchnorm.py converts BN
layers: the BN modules stay where they are (parameters, buffers, state_dict keys, the per-group `group_size`) and
the fused forward reads them, so the optimizer, the EMA and checkpoints see no difference. The statistics are the
layer's own: per group of images for the batched student (`apply_group_bn`), the batch's in training, the running
ones in eval mode (or with DeepLab's frozen BN); the running statistics and num_batches_tracked move as the BN
layer's own calls move them. Statistics over several ranks are not fused: the caller keeps the unfused layers there.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor

from dsp_fast import kernels
from dsp_fast.engine.batchnorm import PerGroupStats
from dsp_fast.models.deeplabv2 import Bottleneck, DeepLabV2


def _fusable(bn: nn.Module) -> bool:
    """BatchNorm2d and its per-group / global subclasses (the caller converts only with one rank, where the global
    ones are plain BN; SyncBatchNorm is not a BatchNorm2d). momentum None (a cumulative average) reads
    num_batches_tracked on the host: left to the unfused layer."""
    return isinstance(bn, nn.BatchNorm2d) and bn.momentum is not None


def bn_act(bn: nn.BatchNorm2d, x: Tensor, residual: Tensor | None = None, relu: bool = True) -> Tensor:
    """The layer `bn` applied to x, then + residual, then ReLU, as one fused call with the layer's own state."""
    group_size = bn.group_size if isinstance(bn, PerGroupStats) else 0
    track = bn.track_running_stats and bn.running_mean is not None
    if bn.training and track:  # one count per group, as the per-group layer's separate calls count
        groups = x.shape[0] // group_size if 0 < group_size < x.shape[0] else 1
        bn.num_batches_tracked.add_(groups)
    return kernels.bn_act(x, bn.weight, bn.bias, bn.running_mean if track else None,
                          bn.running_var if track else None, bn.training, bn.momentum, bn.eps, group_size, residual,
                          relu)


class FusedBottleneck(Bottleneck):
    """Bottleneck whose three BN -> ReLU chains (the last with the identity added) and downsample BN are fused."""

    def forward(self, x: Tensor) -> Tensor:
        out = bn_act(self.bn1, self.conv1(x))
        out = bn_act(self.bn2, self.conv2(out))
        identity = x if self.downsample is None else bn_act(self.downsample[1], self.downsample[0](x), relu=False)
        return bn_act(self.bn3, self.conv3(out), residual=identity)


class FusedDeepLabV2(DeepLabV2):
    """DeepLabV2 whose stem BN -> ReLU is fused (its bottlenecks are converted one by one)."""

    def backbone(self, x_BCHW: Tensor) -> Tensor:
        x = self.maxpool(bn_act(self.bn1, self.conv1(x_BCHW)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _fusable_block(m: Bottleneck) -> bool:
    bns = [m.bn1, m.bn2, m.bn3]
    if m.downsample is not None:
        ds = list(m.downsample)
        if len(ds) != 2 or not isinstance(ds[0], nn.Conv2d):
            return False  # not the conv + BN pair the fused forward expects
        bns.append(ds[1])
    return all(_fusable(bn) for bn in bns)


def convert_fused_bn(model: nn.Module) -> int:
    """Give the DeepLabV2 bottlenecks and stem of `model` the fused forward (in place); a block with a BN layer that
    cannot be fused (statistics over ranks, momentum None) keeps its own. Returns the number of modules converted
    (0 for a model without them, e.g. MiT)."""
    done = 0
    for m in model.modules():
        if type(m) is Bottleneck and _fusable_block(m):
            m.__class__ = FusedBottleneck
            done += 1
        elif type(m) is DeepLabV2 and _fusable(m.bn1):
            m.__class__ = FusedDeepLabV2
            done += 1
    return done


def fused_bn_unavailable(device: torch.device) -> str:
    """Why the fused kernels cannot run on `device` ('' when they can): Triton missing, or a kernel failing to
    compile at its first use. On CUDA, one small forward and backward of each kind (fp32 and bf16, with and
    without residual and ReLU, channels_last) compiles the kernels here, at setup, rather than inside the step."""
    if device.type != "cuda":
        return ""  # CPU tensors run the twin (or the interpreter in tests)
    if not kernels.HAS_TRITON:
        return "triton is not installed (the gpu extra)"
    try:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(2, 8, 3, 5, device=device, dtype=dtype).to(memory_format=torch.channels_last)
            if isinstance(x, FakeTensor):  # shapes only (the memory and cost predictions): nothing compiles
                return ""
            x.requires_grad_()
            w = torch.ones(8, device=device, requires_grad=True)
            b = torch.zeros(8, device=device, requires_grad=True)
            rm, rv = torch.zeros(8, device=device), torch.ones(8, device=device)
            y = kernels.bn_act(x, w, b, rm, rv, True, group_size=1, residual=x.detach())
            y = kernels.bn_act(y, w, b, rm, rv, True, relu=False)
            y.float().sum().backward()
    except Exception as e:  # noqa: BLE001 - any failure of a user's toolchain means: run the unfused layers
        first = (str(e).strip().splitlines() or [""])[0]
        return f"the fused kernels failed at their first use: {type(e).__name__}: {first[:200]}"
    return ""
