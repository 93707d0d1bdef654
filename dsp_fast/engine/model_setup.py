"""The models as the fast step runs them, one function each, in the order engine/trainer.py's `Trainer` applies them:
built (student and teacher), channels_last, fused batch norm, DDP, torch.compile, and the input normalisation made
on the device.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from dsp_fast.config import Config
from dsp_fast.engine.distributed import DistInfo
from dsp_fast.engine.fused_bn import convert_fused_bn, fused_bn_unavailable
from dsp_fast.engine.step import compute_losses
from dsp_fast.models import build_student_teacher
from dsp_fast.models.weights import DEEPLAB_MEAN_BGR, IMAGENET_MEAN_RGB, IMAGENET_STD_RGB


def build_models(cfg: Config, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """Student and teacher, initialised exactly as the reference trainer does (seed, then build)."""
    torch.manual_seed(cfg.train.seed)
    return build_student_teacher(cfg.model, device)


def apply_channels_last(*models: nn.Module) -> None:
    for m in models:
        m.to(memory_format=torch.channels_last)


def fused_bn_wanted(mode: str, device: torch.device) -> bool:
    """fast.fused_bn as a decision: 'auto' is on for CUDA."""
    return mode == "always" or (mode == "auto" and device.type == "cuda")


def apply_fused_bn(mode: str, info: DistInfo, say: Callable[[str], None], *models: nn.Module) -> bool:
    """fast.fused_bn: the models' BN -> ReLU (-> + identity) chains as fused kernels ('auto': on CUDA). Falls back
    to the unfused layers with one line naming the cause: several ranks (the fused statistics are one rank's) or
    kernels that fail at their first use (checked here, before any step or capture). Returns whether it is on."""
    if not fused_bn_wanted(mode, info.device):
        return False
    if info.enabled:
        say(f"fast.fused_bn: off with {info.world_size} ranks (the fused kernels take one rank's batch statistics; "
            "BN over ranks runs unfused)")
        return False
    reason = fused_bn_unavailable(info.device)
    if reason:
        say(f"fast.fused_bn: off, {reason}")
        return False
    for m in models:
        convert_fused_bn(m)
    return True


def apply_compile(mode: str, student: nn.Module, teacher: nn.Module) -> Callable | None:
    """fast.compile: 'model' compiles both models' forward in place (state_dict keys unchanged); 'step' returns
    compute_losses compiled as one graph, backward included, for StepContext.compiled_losses. Inductor's default
    mode: no CUDA graphs of its own (the engine captures the whole step)."""
    if mode == "model":
        student.compile(dynamic=False)
        teacher.compile(dynamic=False)
    if mode == "step":
        return torch.compile(compute_losses, dynamic=False)
    return None


def apply_ddp(model: nn.Module, info: DistInfo, find_unused: bool) -> nn.Module:
    """Wrap the student (never the teacher) in DDP. The three student forwards of a DSP step meet one backward:
    every parameter's gradient hook fires once, so the default reducer works. BN buffers are not broadcast: BN
    uses batch statistics in training, and rank 0's running statistics are the ones evaluated and saved.
    find_unused: source-only training never uses the MMD projection."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    # torch >= 2.13 renames broadcast_buffers (the old name warns); both keep the sync at construction
    params = inspect.signature(DDP).parameters
    sync_kw = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    kwargs = {sync_kw: False, "find_unused_parameters": find_unused}
    if info.device.type != "cuda":
        return DDP(model, **kwargs)
    # DDP built on a side stream, as full-backward CUDA graph capture requires.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ddp = DDP(model, device_ids=[info.device.index], output_device=info.device.index, **kwargs)
    torch.cuda.current_stream().wait_stream(side)
    return ddp


def make_normalize(kind: str, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """`models.normalize_input` with its constants made once on the device: the same arithmetic (same bits), but
    no host-to-device copy per call, which a CUDA graph capture forbids."""
    if kind == "torchvision":
        mean = torch.tensor(IMAGENET_MEAN_RGB, device=device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD_RGB, device=device).view(1, 3, 1, 1)
        return lambda x: (x - mean) / std
    if kind == "deeplab":
        mean_bgr = torch.tensor(DEEPLAB_MEAN_BGR, device=device).view(1, 3, 1, 1)
        return lambda x: x.flip(1) * 255.0 - mean_bgr
    raise ValueError(f"unknown input kind {kind!r}")
