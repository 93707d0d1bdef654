"""The reference's learning-rate schedule and optimizers: torch SGD or AdamW, and SGD as torch 1.7.1 ran the authors'
repeated parameter list."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch

from dsp_fast.config import Config
from dsp_fast.models import param_groups


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
