"""optim.lr_scaling: how a global batch other than the paper's changes the schedule, resolved once at load time."""

from __future__ import annotations

import dataclasses

from dsp_fast.config.schema import Config

PAPER_BATCH = 2  # images per domain per step in the paper: the batch optim.lr_scaling scales from


def apply_lr_scaling(cfg: Config) -> Config:
    """optim.lr_scaling resolved: lr x k (linear) or x sqrt(k), train.max_steps and optim.warmup_steps / k, with
    k = data.batch_size / 2; the result says 'none' so that loading it again does not scale twice."""
    o = cfg.optim
    if o.lr_scaling == "none":
        return cfg
    k = cfg.data.batch_size / PAPER_BATCH
    lr = o.lr * (k if o.lr_scaling == "linear" else k ** 0.5)
    optim = dataclasses.replace(o, lr=lr, lr_scaling="none", warmup_steps=round(o.warmup_steps / k))
    train = dataclasses.replace(cfg.train, max_steps=max(1, round(cfg.train.max_steps / k)))
    return dataclasses.replace(cfg, optim=optim, train=train)
