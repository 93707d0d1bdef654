"""Initial weights from a local file (never a download) and the input normalisation those weights expect.

Two key styles share the backbone names (conv1, bn1, layer1..layer4): torchvision ResNet files add an ImageNet
`fc.*` head and expect RGB normalised by the ImageNet mean/std; DeepLab-v2 files (the AdaptSegNet / DACS init
`DeepLab_resnet_pretrained_init`, keys prefixed `Scale.`, or DACS / DSP training checkpoints) add the ASPP
`layer5.*` and expect Caffe's BGR 0..255 input minus a mean, with no division.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from dsp_fast.config import ConfigError
from dsp_fast.models.deeplabv2 import BACKBONE_ROOTS, CLASSIFIER_ROOT, PROJECTION_ROOT

log = logging.getLogger(__name__)

KINDS = ("torchvision", "deeplab")
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
DEEPLAB_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)
# Wrappers that prefix every key: DataParallel/DDP, torch.compile, and the Caffe-converted DeepLab init file.
_PREFIXES = ("module.", "_orig_mod.", "Scale.")
_SHOW = 4  # keys listed in an error message


class WeightsError(ConfigError):
    """A weights file that is missing, unreadable, or does not fit the model; the message names the file. A
    ConfigError: the file is the value of model.pretrained, so every entry point reports it as a bad setting
    (exit 2, no traceback). The config itself reads no file: this is where the path is first opened."""


def _read_state_dict(path: str) -> tuple[dict[str, Tensor], str | None, bool]:
    """-> (state dict with prefixes stripped, kind declared in the file or None, whether a `Scale.` prefix was seen)."""
    if not os.path.isfile(path):
        raise WeightsError(f"no such weights file: {path}")
    try:
        # weights_only: a checkpoint is data; never run the arbitrary code a pickle can carry.
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types (UnpicklingError, RuntimeError, EOFError) for bad files
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise WeightsError(
            f"{path}: not a torch checkpoint loadable with weights_only=True ({type(e).__name__}: {first[:200]})"
        ) from e
    declared = None
    if isinstance(obj, Mapping):
        if obj.get("input_kind") in KINDS:
            declared = obj["input_kind"]
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a state dict (or one under 'state_dict' / 'model'), "
                           f"got {type(obj).__name__}")
    state: dict[str, Tensor] = {}
    saw_scale = False
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            continue
        stripped = True
        while stripped:
            stripped = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    saw_scale |= prefix == "Scale."
                    key, stripped = key[len(prefix):], True
        state[key] = value
    if not state:
        raise WeightsError(f"{path}: holds no tensors under string keys: not a model state dict")
    return state, declared, saw_scale


def _detect_kind(state: Mapping[str, Tensor], declared: str | None, saw_scale: bool, path: str) -> str:
    if declared is not None:
        return declared
    roots = {k.split(".", 1)[0] for k in state}
    if saw_scale or CLASSIFIER_ROOT in roots:
        return "deeplab"
    if "fc" in roots:
        return "torchvision"
    # Backbone-only files carry no trace of the input convention, and a wrong guess trains silently worse.
    raise WeightsError(
        f"{path}: cannot tell the weights kind (no 'fc.*' head of torchvision, no 'layer5.*' / 'Scale.' of DeepLab); "
        f"pass kind='torchvision' or 'deeplab', or save the file with an 'input_kind' entry beside 'state_dict'"
    )


def _fmt(keys: list[str]) -> str:
    more = f", ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def _check_fits(head: str, problems: list[tuple[str, list[str]]]) -> None:
    """WeightsError `head` followed by every non-empty (what, keys) problem, counted and listed."""
    parts = [f"{len(keys)} {what} ({_fmt(keys)})" for what, keys in problems if keys]
    if parts:
        raise WeightsError(head + "; ".join(parts))


def _copy_heads(state: Mapping[str, Tensor], target: Mapping[str, Tensor], heads: tuple[tuple[str, str], ...],
                to_load: dict[str, Tensor], path: str) -> tuple[list[str], list[str]]:
    """Each head (root module, name) goes whole into `to_load` when the file has all of it with the model's shapes;
    returns the notes on the heads that keep their initialisation, and among them the heads the file has with
    other shapes (another class count: worth telling the user, the trainers print them)."""
    notes, refit = [], []
    for root, what in heads:
        keys = [k for k in target if k.startswith(f"{root}.") and not k.endswith("num_batches_tracked")]
        if not any(k in state for k in keys):
            notes.append(f"{what} ({root}.*) not in the file: kept its initialisation")
        elif all(k in state and state[k].shape == target[k].shape for k in keys):
            to_load.update({k: state[k] for k in keys})
        else:
            k = next(k for k in keys if k in state and state[k].shape != target[k].shape)
            refit.append(f"{path}: the {what} ({root}.*) does not fit this model ({k} is {tuple(state[k].shape)} in "
                         f"the file, {tuple(target[k].shape)} in the model): the {what} starts fresh (random "
                         "initialisation), the rest is loaded")
    return notes + refit, refit


def _finish_load(model: nn.Module, path: str, to_load: dict[str, Tensor], kind: str, notes: list[str],
                 refit: list[str], what: str) -> str:
    # strict=False because a head may be skipped; the completeness of the backbone was checked before. A model on
    # the meta device is only being checked against the file (models.check_weights_file): nothing to copy into.
    if not any(p.is_meta for p in model.parameters()):
        model.load_state_dict(to_load, strict=False)
    model.input_kind = kind
    model.weights_notes, model.weights_refit = notes, refit
    log.info("loaded %s weights from %s (%d tensors)", what, path, len(to_load))
    for note in notes:
        log.info("weights %s: %s", path, note)
    return kind


def load_pretrained(model: nn.Module, path: str, kind: str | None = None) -> str:
    """Copy the weights in `path` into `model`; return and set `model.input_kind` ('deeplab' or 'torchvision').
    The backbone must match completely (shapes included), else WeightsError. The classifier (`layer5`) and the
    projection (`c1`) are copied whole when the file has them with the model's shapes, else keep their
    initialisation (ImageNet 1000 or COCO/VOC 21 classes is normal); what was skipped is logged and kept in
    `model.weights_notes`. `kind` overrides the detected key style."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    state, declared, saw_scale = _read_state_dict(path)
    target = model.state_dict()

    backbone = [k for k in target if k.split(".", 1)[0] in BACKBONE_ROOTS and not k.endswith("num_batches_tracked")]
    missing = [k for k in backbone if k not in state]
    wrong = [f"{k} file {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
             for k in backbone if k in state and state[k].shape != target[k].shape]
    _check_fits(f"{path}: not weights of model.arch={getattr(model, 'arch', type(model).__name__)!r}: ",
                [("backbone keys missing", missing), ("backbone tensors with wrong shapes", wrong)])
    kind = kind or _detect_kind(state, declared, saw_scale, path)

    to_load = {k: state[k] for k in target if k.split(".", 1)[0] in BACKBONE_ROOTS and k in state
               and state[k].shape == target[k].shape}
    notes, refit = _copy_heads(state, target, ((CLASSIFIER_ROOT, "classifier"), (PROJECTION_ROOT, "MMD projection")),
                               to_load, path)
    if any(k.startswith("fc.") for k in state):
        notes.append("torchvision ImageNet head (fc.*) ignored")
    others = sorted(k for k in state if k not in target and not k.startswith("fc."))
    if others:
        notes.append(f"{len(others)} keys unknown to the model ignored ({_fmt(others)})")
    return _finish_load(model, path, to_load, kind, notes, refit, kind)


def normalize_input(x_BCHW: Tensor, kind: str) -> Tensor:
    """Map float RGB images in 0..1 to what the weights of `kind` expect: 'torchvision' (x - ImageNet mean) / std,
    RGB; 'deeplab' BGR, x * 255 - DEEPLAB_MEAN_BGR, no division."""
    if x_BCHW.dim() != 4 or x_BCHW.shape[1] != 3:
        raise ValueError(f"expected an RGB batch of shape (B, 3, H, W), got {tuple(x_BCHW.shape)}")
    if kind == "torchvision":
        mean = x_BCHW.new_tensor(IMAGENET_MEAN_RGB).view(1, 3, 1, 1)
        std = x_BCHW.new_tensor(IMAGENET_STD_RGB).view(1, 3, 1, 1)
        return (x_BCHW - mean) / std
    if kind == "deeplab":
        mean = x_BCHW.new_tensor(DEEPLAB_MEAN_BGR).view(1, 3, 1, 1)
        return x_BCHW.flip(1) * 255.0 - mean
    raise ValueError(f"unknown input kind {kind!r} (known: {', '.join(KINDS)})")


# ------------------------------------------------------------------------------------------------ MiT (SegFormer)
_MIT_IMAGENET_HEAD = "head."  # the ImageNet classifier in SegFormer's released mit_b*.pth files
_MIT_ALLOWED_PREFIXES = ("backbone.", "decode_head.", "c1.")


def load_mit_pretrained(model: nn.Module, path: str) -> str:
    """Copy a SegFormer / mmseg MiT weights file into a MiTDAFormer's encoder; returns the input kind ('torchvision').
    Two key styles: the released ImageNet files (`patch_embed1.proj.weight`, `block1.0.attn.q.weight`, ...,
    `norm4.bias`, plus the ImageNet classifier `head.*`, ignored), or an mmseg segmentor's state dict with the same
    names under `backbone.` (its `decode_head.*` and `c1.*` are copied too when their shapes fit this model, e.g.
    the same class count). The encoder must match completely: any missing key, tensor of the wrong shape, or key
    this model does not know is a WeightsError naming them (a silent partial load would train a random encoder)."""
    state, _, _ = _read_state_dict(path)
    segmentor = any(k.startswith("backbone.") for k in state)
    target = model.state_dict()
    encoder_target = {k: v for k, v in target.items() if k.startswith("backbone.")}
    if segmentor:
        unknown = [k for k in state if not k.startswith(_MIT_ALLOWED_PREFIXES)
                   and not k.startswith(("auxiliary_head.", _MIT_IMAGENET_HEAD))]
        file_encoder = {k: v for k, v in state.items() if k.startswith("backbone.")}
    else:
        unknown = []
        file_encoder = {}
        for k, v in state.items():
            if k.startswith(_MIT_IMAGENET_HEAD):
                continue
            if f"backbone.{k}" in encoder_target:
                file_encoder[f"backbone.{k}"] = v
            else:
                unknown.append(k)
    unknown += [k for k in file_encoder if k not in encoder_target]
    missing = [k for k in encoder_target if k not in file_encoder]
    wrong = [f"{k} file {tuple(file_encoder[k].shape)} vs model {tuple(v.shape)}"
             for k, v in encoder_target.items() if k in file_encoder and file_encoder[k].shape != v.shape]
    _check_fits(f"{path}: not weights of model.arch={getattr(model, 'arch', 'MiT')!r}: ",
                [("encoder keys missing", missing), (f"keys unknown to {getattr(model, 'arch', 'the model')}", unknown),
                 ("tensors with wrong shapes", wrong)])
    to_load = dict(file_encoder)
    notes = ["ImageNet classifier (head.*) ignored"] if any(k.startswith(_MIT_IMAGENET_HEAD) for k in state) else []
    heads, refit = _copy_heads(state, target, (("decode_head", "decoder"), ("c1", "MMD projection")), to_load, path)
    # MiT's ImageNet weights expect the ImageNet mean/std on RGB
    return _finish_load(model, path, to_load, "torchvision", notes + heads, refit, "MiT")
