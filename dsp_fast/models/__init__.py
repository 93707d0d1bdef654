"""The segmentation model: DeepLabv2 (ResNet-101 or `tiny`) or MiT + DAFormer decoder (`mit_b0`..`mit_b5`), its
weights, and its optimizer parameter groups.

Imports nothing of dsp_fast but the config, so data, evaluation and both trainers can share it.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

from dsp_fast.config import ModelConfig
from dsp_fast.models import deeplabv2
from dsp_fast.models.daformer_head import MiTDAFormer
from dsp_fast.models.deeplabv2 import (
    BACKBONE_ROOTS,
    CLASSIFIER_ROOT,
    PROJECTION_ROOT,
    DeepLabV2,
    count_parameters,
    output_size,
    script_backbone_listing,
    script_multiplicity,
)
from dsp_fast.models.mit import MIT_SPECS
from dsp_fast.models.weights import WeightsError, load_mit_pretrained, load_pretrained, normalize_input
from dsp_fast.models.wrapper import unwrap

ARCHS = (*deeplabv2.ARCHS, *MIT_SPECS)  # every model.arch value

__all__ = [
    "ARCHS", "DeepLabV2", "MiTDAFormer", "WeightsError", "build_model", "build_student_teacher", "check_weights_file",
    "count_parameters", "load_mit_pretrained", "load_pretrained", "normalize_input", "output_size", "param_groups",
    "script_backbone_listing", "script_multiplicity", "set_bn_mode", "unwrap",
]


def check_weights_file(cfg: ModelConfig) -> list[str]:
    """Before a trainer prepares data or makes a run folder: model.pretrained, when set, is a weights file of
    model.arch (read, and matched against the model built on the meta device: no memory, no copy), else a
    WeightsError naming the file and the mismatch. Returns the lines the trainers print: the heads the file has with
    other shapes (16-class weights into a 19-class model), which start fresh."""
    if not cfg.pretrained:
        return []
    if not os.path.isfile(cfg.pretrained):
        raise WeightsError(f"config field 'model.pretrained': no such weights file: {cfg.pretrained}")
    with torch.device("meta"):
        return build_model(cfg).weights_refit


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model `cfg` describes, with `cfg.pretrained` loaded when set (random init: input_kind 'torchvision')."""
    if cfg.arch in MIT_SPECS:
        model: nn.Module = MiTDAFormer(cfg.arch, num_classes=cfg.num_classes, mmd_dim=cfg.mmd_dim,
                                       decoder_dim=cfg.decoder_dim, drop_path_rate=cfg.drop_path_rate,
                                       freeze_bn=cfg.freeze_bn)
    else:
        model = DeepLabV2.from_arch(cfg.arch, num_classes=cfg.num_classes, mmd_dim=cfg.mmd_dim,
                                    aspp_two_branch_bug=cfg.aspp_two_branch_bug, freeze_bn=cfg.freeze_bn)
    if cfg.pretrained:  # the file is first opened here (the config reads none): the error names the field
        try:
            if isinstance(model, MiTDAFormer):
                load_mit_pretrained(model, cfg.pretrained)
            else:
                load_pretrained(model, cfg.pretrained,
                                kind=None if cfg.pretrained_kind == "auto" else cfg.pretrained_kind)
        except WeightsError as e:
            raise WeightsError(f"config field 'model.pretrained': {e}") from None
    set_bn_mode(model, cfg.freeze_bn)
    return model


def build_student_teacher(cfg: ModelConfig, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """The student in training mode and its mean teacher: an exact copy that never takes a gradient (and, for
    MiT, never drops a path or a channel: its pseudo-labels are deterministic, as DAFormer's EMA teacher's)."""
    student = build_model(cfg).to(device)
    student.train()
    set_bn_mode(student, cfg.freeze_bn)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    if isinstance(teacher, MiTDAFormer):
        teacher.set_stochastic(False)
    return student, teacher


def set_bn_mode(model: nn.Module, freeze_bn: bool) -> None:
    """freeze_bn: every BN uses running statistics (eval mode); otherwise BN follows the model's own mode. The
    choice is remembered by the model (DeepLabV2 or MiTDAFormer, or a wrapper holding one as `.module`)."""
    inner = unwrap(model)
    if isinstance(inner, MiTDAFormer):
        inner.freeze_bn = freeze_bn
    deeplabv2.set_bn_mode(model, freeze_bn)


def param_groups(model: nn.Module, lr: float, head_lr_mult: float, train_mmd_projection: bool = True,
                 weight_decay: float | None = None, norm_decay_mult: float = 1.0) -> list[dict[str, Any]]:
    """Optimizer parameter groups, each with 'name' and 'lr_mult' (group lr = base lr now * lr_mult): the backbone
    at lr, the classifier head (DeepLab's ASPP or the DAFormer decoder) and the MMD projection at lr * head_lr_mult;
    trainable parameters only. train_mmd_projection False freezes the projection and leaves it out, as the authors'
    script never gives it to the optimizer (gradients still flow through it). norm_decay_mult != 1 moves parameters
    named '*norm*' into '<group>_norm' groups with weight decay weight_decay * norm_decay_mult (mmcv's custom_keys
    rule that DAFormer uses)."""
    inner = unwrap(model)  # accept a DDP / DataParallel wrapper
    backbone_roots, classifier_root, projection_root = getattr(
        inner, "param_roots", (BACKBONE_ROOTS, CLASSIFIER_ROOT, PROJECTION_ROOT))
    for p in inner.get_submodule(projection_root).parameters():
        p.requires_grad_(train_mmd_projection)
    by_root: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, p in inner.named_parameters():
        if p.requires_grad:
            by_root.setdefault(name.split(".", 1)[0], []).append((name, p))
    unknown = set(by_root) - set(backbone_roots) - {classifier_root, projection_root}
    if unknown:
        raise ValueError(f"param_groups: trainable parameters under unknown modules {sorted(unknown)}")

    named = [("backbone", [np for r in backbone_roots for np in by_root.get(r, [])], 1.0),
             ("classifier", by_root.get(classifier_root, []), float(head_lr_mult))]
    if train_mmd_projection:
        named.append(("mmd_projection", by_root.get(projection_root, []), float(head_lr_mult)))
    split = norm_decay_mult != 1.0
    if split and weight_decay is None:
        raise ValueError("param_groups: norm_decay_mult needs weight_decay")
    groups = []
    for group_name, params, mult in named:
        rest = [p for n, p in params if not (split and "norm" in n)]
        groups.append({"name": group_name, "params": rest, "lr_mult": mult})
        if split:
            norms = [p for n, p in params if "norm" in n]
            groups.append({"name": f"{group_name}_norm", "params": norms, "lr_mult": mult,
                           "weight_decay": weight_decay * norm_decay_mult})
    for g in groups:
        g["lr"] = lr * g["lr_mult"]
    return [g for g in groups if g["params"]]
