"""Features applied to the models and the optimizer, one function each, in the order engine/trainer.py's `Trainer`
applies them: channels_last, the optimizer (fused SGD or AdamW with a device lr; optionally the authors' repeated
SGD updates) and its lr schedule, the GradScaler, DDP, torch.compile, and the input normalisation.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from dsp_fast.config import Config, ConfigError, FastConfig, OptimConfig
from dsp_fast.engine.distributed import DistInfo
from dsp_fast.engine.step import compute_losses
from dsp_fast.models import build_student_teacher, param_groups, script_multiplicity
from dsp_fast.models.weights import DEEPLAB_MEAN_BGR, IMAGENET_MEAN_RGB, IMAGENET_STD_RGB


def build_models(cfg: Config, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """Student and teacher, initialised exactly as the reference trainer does (seed, then build)."""
    torch.manual_seed(cfg.train.seed)
    return build_student_teacher(cfg.model, device)


def apply_channels_last(*models: nn.Module) -> None:
    for m in models:
        m.to(memory_format=torch.channels_last)


def build_optimizer(cfg: Config, model: nn.Module, opts: FastConfig, device: torch.device,
                    device_lr: bool | None = None) -> tuple[torch.optim.Optimizer, bool]:
    """SGD or AdamW (`optim.algorithm`) over the model's parameter groups; returns (optimizer, device_skip).

    device_skip: the optimizer reads `optimizer.found_inf` on the device (torch's fused SGD and AdamW), so a
    non-finite step is skipped without a host sync. On CUDA the fused lr is a device tensor per group, filled in
    place each step (a CUDA graph replays it). On CPU fused SGD gives the same bits as foreach (checked on torch
    2.13) and takes a float lr. device_lr: the lr as a device tensor (default: on CUDA); the CPU tests ask for it
    to check the CUDA setup. optim.script_param_repeats: the backbone split by the authors' multiplicities, stepped
    by RepeatedSGD (each group its own device lr tensor).
    """
    o = cfg.optim
    groups = param_groups(model, o.lr, o.head_lr_mult, cfg.dsp.train_mmd_projection, o.weight_decay,
                          o.norm_decay_mult)
    if o.script_param_repeats:
        groups = split_by_repeats(groups, script_multiplicity(model))
    if opts.optimizer == "apex":
        try:
            from apex.optimizers import FusedSGD
        except ImportError as e:
            raise ConfigError(f"config field 'fast.optimizer': 'apex' (--optimizer apex), but NVIDIA apex does not "
                              f"import here ({e}); use --optimizer fused") from None
        return FusedSGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay), False
    fused = opts.optimizer in ("auto", "fused")
    on_cuda = fused and device.type == "cuda"
    if fused and (on_cuda if device_lr is None else device_lr):
        for g in groups:
            g["lr"] = torch.tensor(g["lr"], dtype=torch.float32, device=device)
    if o.algorithm == "adamw":
        # capturable keeps Adam's step counters on the device and lets a CUDA graph capture
        # the step (Adam.step refuses a capture otherwise); fused reads the tensor lr and found_inf on the device.
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, fused=fused or None,
                                foreach=True if not fused else None, capturable=on_cuda)
        return opt, fused
    sgd = RepeatedSGD if o.script_param_repeats else torch.optim.SGD
    opt = sgd(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, fused=fused or None,
              foreach=True if not fused else None)
    if o.momentum:
        # Fused SGD leaves the momentum buffers uninitialised when its first step is skipped (seen on CPU); zeros give
        # the same first update as the lazy clone (0 * momentum + grad).
        for g in opt.param_groups:
            for p in g["params"]:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return opt, fused


class RepeatedSGD(torch.optim.SGD):
    """SGD whose groups carry 'repeats' k (default 1): each step moves a group's parameters k times in a row with
    the gradient fixed, the weight decay read from the parameter as it now is and the momentum buffer carried from
    one update to the next (torch 1.7.1's SGD on a parameter listed k times, as the authors' optimizer held the
    backbone).

    Pass r (1..max k) runs torch's own step on the groups with k >= r, so every pass is the same fused call as a
    plain step: the device lr tensors, the found_inf skip flag (read again on every pass) and no host sync.
    """

    def step(self, closure: Callable | None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("RepeatedSGD.step: a closure would be re-evaluated on every pass; not supported")
        groups = self.param_groups
        try:
            for r in range(1, max(g.get("repeats", 1) for g in groups) + 1):
                # torch's step walks self.param_groups: show it this pass's subset, then the full list again
                self.param_groups = [g for g in groups if g.get("repeats", 1) >= r]
                super().step()
        finally:
            self.param_groups = groups


def split_by_repeats(groups: list[dict], counts: dict[int, int]) -> list[dict]:
    """The groups, each given a 'repeats' key: a backbone group split by its parameters' multiplicity in `counts`
    (id -> k; `models.script_multiplicity`) into '<name>_x<k>' groups at k, every other group at 1."""
    out = []
    for g in groups:
        if not g["name"].startswith("backbone"):
            out.append({**g, "repeats": 1})
            continue
        missing = [p for p in g["params"] if id(p) not in counts]
        if missing:
            raise ValueError(f"split_by_repeats: {len(missing)} parameters of group {g['name']!r} are not in the "
                             "authors' listing")
        for k in sorted({counts[id(p)] for p in g["params"]}):
            params = [p for p in g["params"] if counts[id(p)] == k]
            out.append({**g, "name": f"{g['name']}_x{k}", "params": params, "repeats": k})
    return out


def apply_compile(mode: str, student: nn.Module, teacher: nn.Module) -> Callable | None:
    """fast.compile: 'model' compiles both models' forward in place (state_dict keys unchanged); 'step' returns
    compute_losses compiled as one graph (teacher, mixing, student forwards, losses; autograd compiles its
    backward), to be put in StepContext.compiled_losses. Inductor's default mode: no CUDA graphs of its own, the
    engine captures the whole step, SGD and EMA included."""
    if mode == "model":
        student.compile(dynamic=False)
        teacher.compile(dynamic=False)
    if mode == "step":
        return torch.compile(compute_losses, dynamic=False)
    return None


def scheduled_lr(o: OptimConfig, step: int, max_steps: int) -> float:
    """The base lr at `step` (0-based): poly decay lr * (1 - step/max_steps) ** poly_power, during the first
    warmup_steps scaled by 1 - (1 - step/warmup_steps) * (1 - warmup_ratio) (mmcv's linear warm-up, DAFormer's
    schedule). A host float: the caller fills the optimizer's device lr tensors with it outside the step."""
    lr = o.lr * (1 - step / max_steps) ** o.poly_power
    if step < o.warmup_steps:
        lr *= 1 - (1 - step / o.warmup_steps) * (1 - o.warmup_ratio)
    return lr


def build_grad_scaler(dtype: torch.dtype, device: torch.device) -> torch.amp.GradScaler:
    """Enabled for fp16 only; bf16 and fp32 need no loss scaling (a disabled scaler is a pass-through)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


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
