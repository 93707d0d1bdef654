"""The segmentation model: DeepLabv2 (ResNet-101 or `tiny`), its weights, and its optimizer parameter groups.

Imports nothing of dsp_fast but the config, so data, evaluation and both trainers can share it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from dsp_fast.config import ModelConfig
from dsp_fast.models.deeplabv2 import (
    ARCHS,
    BACKBONE_ROOTS,
    CLASSIFIER_ROOT,
    PROJECTION_ROOT,
    DeepLabV2,
    count_parameters,
    output_size,
    set_bn_mode,
)
from dsp_fast.models.weights import WeightsError, load_pretrained, normalize_input

__all__ = [
    "ARCHS",
    "DeepLabV2",
    "WeightsError",
    "build_model",
    "build_student_teacher",
    "count_parameters",
    "load_pretrained",
    "normalize_input",
    "output_size",
    "param_groups",
    "set_bn_mode",
]


def build_model(cfg: ModelConfig) -> DeepLabV2:
    """The model `cfg` describes, with `cfg.pretrained` loaded when set (random init: input_kind 'torchvision')."""
    model = DeepLabV2.from_arch(cfg.arch, num_classes=cfg.num_classes, mmd_dim=cfg.mmd_dim,
                                aspp_two_branch_bug=cfg.aspp_two_branch_bug, freeze_bn=cfg.freeze_bn)
    if cfg.pretrained:
        load_pretrained(model, cfg.pretrained, kind=None if cfg.pretrained_kind == "auto" else cfg.pretrained_kind)
    set_bn_mode(model, cfg.freeze_bn)
    return model


def build_student_teacher(cfg: ModelConfig, device: torch.device) -> tuple[DeepLabV2, DeepLabV2]:
    """The student in training mode and its mean teacher: an exact copy that never takes a gradient."""
    student = build_model(cfg).to(device)
    student.train()
    set_bn_mode(student, cfg.freeze_bn)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


def param_groups(model: nn.Module, lr: float, head_lr_mult: float,
                 train_mmd_projection: bool = True) -> list[dict[str, Any]]:
    """SGD parameter groups: backbone at lr, ASPP classifier (and the MMD projection) at lr * head_lr_mult.

    Every group carries 'lr_mult' (a poly schedule sets group['lr'] = base_lr_now * group['lr_mult']) and 'name'.
    Only parameters with requires_grad are listed (BN affine parameters are frozen). With train_mmd_projection
    False the projection is frozen (requires_grad False) and left out, as in the authors' script, where it is
    never given to the optimizer; gradients still flow through it into the backbone.
    """
    inner = getattr(model, "module", model)  # accept a DDP / DataParallel wrapper
    for p in inner.get_submodule(PROJECTION_ROOT).parameters():
        p.requires_grad_(train_mmd_projection)
    by_root: dict[str, list[nn.Parameter]] = {}
    for name, p in inner.named_parameters():
        if p.requires_grad:
            by_root.setdefault(name.split(".", 1)[0], []).append(p)
    unknown = set(by_root) - set(BACKBONE_ROOTS) - {CLASSIFIER_ROOT, PROJECTION_ROOT}
    if unknown:
        raise ValueError(f"param_groups: trainable parameters under unknown modules {sorted(unknown)}")

    groups = [
        {"name": "backbone", "params": [p for r in BACKBONE_ROOTS for p in by_root.get(r, [])], "lr_mult": 1.0},
        {"name": "classifier", "params": by_root.get(CLASSIFIER_ROOT, []), "lr_mult": float(head_lr_mult)},
    ]
    if train_mmd_projection:
        groups.append({"name": "mmd_projection", "params": by_root.get(PROJECTION_ROOT, []),
                       "lr_mult": float(head_lr_mult)})
    for g in groups:
        g["lr"] = lr * g["lr_mult"]
    return [g for g in groups if g["params"]]
