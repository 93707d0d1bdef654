"""The optimizer of the fast step: fused SGD or AdamW with a device lr (a CUDA graph reads it in place), the authors'
repeated SGD updates on request (optim.script_param_repeats), the poly lr schedule and the GradScaler (fp16 only).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dsp_fast.config import Config, ConfigError, FastConfig, OptimConfig
from dsp_fast.models import param_groups, script_multiplicity


def build_optimizer(cfg: Config, model: nn.Module, opts: FastConfig, device: torch.device,
                    device_lr: bool | None = None) -> tuple[torch.optim.Optimizer, bool]:
    """SGD or AdamW (`optim.algorithm`) over the model's parameter groups; returns (optimizer, device_skip).

    device_skip: the optimizer reads `optimizer.found_inf` on the device (fused SGD and AdamW): no host sync. The
    fused lr is a device tensor per group on CUDA (filled in place each step; a CUDA graph replays it), a float on
    CPU, where fused SGD gives foreach's bits; device_lr forces the tensor lr (the CPU tests of the CUDA setup).
    optim.script_param_repeats: the backbone split by the authors' multiplicities, stepped by RepeatedSGD."""
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
    """SGD whose groups carry 'repeats' k (default 1): each step moves a group's parameters k times with the gradient
    fixed, weight decay and momentum carried from update to update (torch 1.7.1's SGD on a parameter listed k times,
    as the authors' optimizer held the backbone). Pass r runs torch's own fused step on the groups with k >= r:
    device lr tensors, found_inf read on every pass, no host sync."""

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
