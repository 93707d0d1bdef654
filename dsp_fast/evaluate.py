"""Evaluation: confusion matrix, per-class IoU, mIoU (19, 16 and 13-class variants) and the eval loop.

`python -m dsp_fast.evaluate --checkpoint RUN/ckpt_<step>.pt` (or a run folder: its newest good checkpoint) prints
the IoU table (docs/evaluate.md). Exit code 2: missing, unreadable or corrupt checkpoint, bad config or data, the
file named. Images are evaluated single scale at `data.eval_size`, labels resized to it with nearest neighbour, as
the authors' evaluation does at 1024x512; whole or sliding-window, flipped or not: dsp_fast/inference.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch

from dsp_fast.checkpoint_file import read_checkpoint_file
from dsp_fast.config import Config, ConfigError, config_from_dict, load_config, parse_override, split_overrides
from dsp_fast.data import IGNORE_LABEL, SYNTHIA13_INDICES, DatasetError, class_names, resize_image, resize_label
from dsp_fast.data.build import dataset_roots, target_dataset
from dsp_fast.inference import Inference, add_inference_flags, inference_from_flags, predict_batch
from dsp_fast.models import build_model
from dsp_fast.run_io import PROVENANCE, resolve_device


class InputError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the config: exit code 2, the file named."""


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_LABEL) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows = ground truth, columns = prediction; ignored pixels dropped.

    Any other label outside [0, num_classes) is an error (a silent drop would hide a label-mapping bug)."""
    pred, label = torch.as_tensor(pred), torch.as_tensor(label)
    if pred.shape != label.shape:
        raise ValueError(f"confusion_matrix: pred shape {tuple(pred.shape)} != label shape {tuple(label.shape)}")
    label = label.reshape(-1).long()
    pred = pred.reshape(-1).long()
    keep = label != ignore_index
    label, pred = label[keep], pred[keep]
    if label.numel() and (label.min() < 0 or label.max() >= num_classes):
        raise ValueError(f"confusion_matrix: label ids outside [0, {num_classes}) other than {ignore_index}")
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"confusion_matrix: predicted ids outside [0, {num_classes})")
    flat = label * num_classes + pred
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(conf: torch.Tensor) -> torch.Tensor:
    """Per-class IoU = TP / (TP + FP + FN) as float64; NaN for a class absent from both labels and predictions."""
    conf = torch.as_tensor(conf).double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = tp / union
    iou[union == 0] = math.nan
    return iou


def mean_iou(iou: torch.Tensor, indices: list[int] | None = None) -> float:
    """mIoU over the given classes (all by default), ignoring NaN (classes never seen nor predicted)."""
    values = iou if indices is None else iou[list(indices)]
    values = values[~torch.isnan(values)]
    return float(values.mean()) if values.numel() else math.nan


def miou_variants(iou: torch.Tensor) -> dict[str, float]:
    """The figures papers report: mIoU over all classes, plus the 13-class mIoU* for a 16-class SYNTHIA model."""
    out = {f"mIoU{len(iou)}": mean_iou(iou)}
    if len(iou) == 16:
        out["mIoU13"] = mean_iou(iou, SYNTHIA13_INDICES)
    return out


def format_iou_table(iou: torch.Tensor) -> str:
    """A per-class IoU table with the mIoU variants at the bottom, in percent. n/a: a class neither in the labels
    nor predicted; the mIoU averages the others, and its line says over how many."""
    names = class_names(len(iou))
    width = max(len(n) for n in names) + 2
    lines = [f"{'class':<{width}}IoU"]
    for name, value in zip(names, iou.tolist()):
        lines.append(f"{name:<{width}}{'  n/a' if math.isnan(value) else f'{100 * value:5.1f}'}")
    for key, value in miou_variants(iou).items():
        subset = iou if key == f"mIoU{len(iou)}" else iou[list(SYNTHIA13_INDICES)]
        n = int((~torch.isnan(subset)).sum())
        lines.append(f"{key:<{width}}{100 * value:5.1f}  (over {n} of {len(subset)} classes)")
    return "\n".join(lines)


@torch.no_grad()
def predict(model: torch.nn.Module, image_uint8_HWC: np.ndarray, device: torch.device,
            how: Inference = Inference()) -> torch.Tensor:
    """Single-scale prediction (H, W) at the image's own size (`how`: whole by default)."""
    return predict_batch(model, [image_uint8_HWC], device, how=how)[0]


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, eval_size: tuple[int, int], num_classes: int,
             device: torch.device, max_images: int = 0, how: Inference = Inference()) -> torch.Tensor:
    """Confusion matrix of `model` over `dataset` at eval_size (width, height), each image segmented as `how` says
    (whole by default, as the trainers' periodic evaluation). BN runs in eval mode here."""
    was_training = model.training
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    count = len(dataset) if max_images == 0 else min(max_images, len(dataset))
    try:
        for i in range(count):
            image, label = dataset[i]
            pred = predict(model, resize_image(image, eval_size), device, how).cpu()
            conf += confusion_matrix(pred, torch.from_numpy(np.array(resize_label(label, eval_size))), num_classes)
    finally:
        model.train(was_training)
    return conf


def target_iou(cfg: Config, model: torch.nn.Module) -> torch.Tensor:
    """Per-class IoU of `model` on the configured eval split (data.eval_split, eval_size, max_eval_images), on the
    model's device."""
    dataset = target_dataset(cfg, cfg.data.eval_split, labels=True)
    device = next(model.parameters()).device
    return iou_from_confusion(evaluate(model, dataset, cfg.data.eval_size, cfg.model.num_classes, device,
                                       cfg.data.max_eval_images))


def read_checkpoint(path: str) -> dict:
    """A trainer checkpoint, read with weights_only=True; a missing or unreadable file is an InputError naming it."""
    try:
        ckpt = read_checkpoint_file(path)
    except FileNotFoundError:
        raise InputError(f"checkpoint not found: {path} (the trainers write RUN/ckpt_<step>.pt, RUN/best.pt and, "
                         "the reference trainer, RUN/last.pt)") from None
    except ValueError as e:
        raise InputError(str(e)) from None
    if not isinstance(ckpt, dict) or "config" not in ckpt and "student" not in ckpt:
        raise InputError(f"{path} is not a dsp_fast checkpoint (no student weights, no config)")
    return ckpt


_PERIODIC = re.compile(r"^ckpt_(\d+)\.pt$")  # the fast trainer's ckpt_<step>.pt (engine/checkpoint.py)
_LAST = "last.pt"  # the reference trainer's one checkpoint per model (reference/resume.py)
_ADAPTED = "dsp"  # a train.compare_source_only run keeps the adapted model in this subfolder


def open_checkpoint(spec: str) -> tuple[str, dict]:
    """(path, contents) of `spec`: a checkpoint file, or a run folder's newest checkpoint that reads and verifies
    (ckpt_<step>.pt by step, or last.pt; in the folder itself, else in its dsp/ subfolder, the adapted model of a
    train.compare_source_only run). Bad newer files are passed over and named on stderr."""
    if not os.path.isdir(spec):
        return spec, read_checkpoint(spec)
    for folder in (spec, os.path.join(spec, _ADAPTED)):
        names = os.listdir(folder) if os.path.isdir(folder) else []
        steps = sorted((int(m.group(1)), n) for n in names if (m := _PERIODIC.match(n)))
        found = [os.path.join(folder, n) for _, n in steps] + ([os.path.join(folder, _LAST)] if _LAST in names else [])
        bad = []
        for path in reversed(found):
            try:
                ckpt = read_checkpoint(path)
            except InputError as e:
                bad.append(str(e))
                continue
            if bad:
                print(f"warning: passed over {len(bad)} bad checkpoint(s) in {folder}: {'; '.join(bad)}",
                      file=sys.stderr)
            print(f"checkpoint: {path} (the newest good one in {spec})")
            return path, ckpt
        if bad:
            raise InputError(f"{folder}: no good checkpoint: {'; '.join(bad)}")
    raise InputError(f"{spec}: no checkpoint (ckpt_<step>.pt, last.pt) in this folder or its {_ADAPTED}/ subfolder")


def training_folder(checkpoint_path: str) -> str | None:
    """The folder the run of a checkpoint was started from (provenance.json's `cwd`, in the checkpoint's folder or
    the run folder above a model's subfolder), when it still exists; its config's relative paths mean paths there."""
    folder = os.path.dirname(os.path.abspath(checkpoint_path))
    for candidate in (folder, os.path.dirname(folder)):
        try:
            with open(os.path.join(candidate, PROVENANCE)) as f:
                cwd = json.load(f).get("cwd")
        except (OSError, ValueError, AttributeError):
            continue
        return cwd if isinstance(cwd, str) and os.path.isdir(cwd) else None
    return None


def load_checkpoint_model(cfg: Config, ckpt: dict, path: str, which: str, device: torch.device) -> torch.nn.Module:
    """Build the configured model and load the student or teacher weights of a checkpoint."""
    if which not in ckpt:
        raise InputError(f"checkpoint {path} has no '{which}' weights (keys: {', '.join(ckpt)})")
    saved_arch = (ckpt.get("config") or {}).get("model", {}).get("arch")
    if saved_arch and saved_arch != cfg.model.arch:
        raise InputError(f"checkpoint {path} holds a {saved_arch!r} model, but the config builds model.arch="
                         f"{cfg.model.arch!r}; evaluate it with its own config (no --config, no model.arch override)")
    model = build_model(cfg.model)
    try:
        model.load_state_dict(ckpt[which])
    except RuntimeError:
        raise InputError(f"checkpoint {path} does not fit model.arch={cfg.model.arch!r} as configured: "
                         f"{_state_dict_difference(model.state_dict(), ckpt[which])}") from None
    model.input_kind = ckpt.get("input_kind", "torchvision")
    return model.to(device)


def _state_dict_difference(want: dict, got: dict) -> str:
    """One line on how a checkpoint's weights differ from the model's (torch's own message lists every key, 12 KB
    for a DeepLab): counts, and the first key of each kind."""
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    shaped = [k for k in want if k in got and tuple(want[k].shape) != tuple(got[k].shape)]
    parts = [f"{len(missing)} missing (first {missing[0]})" if missing else "",
             f"{len(unexpected)} unexpected (first {unexpected[0]})" if unexpected else "",
             f"{len(shaped)} of another shape (first {shaped[0]}: {tuple(got[shaped[0]].shape)} in the checkpoint, "
             f"{tuple(want[shaped[0]].shape)} in the model)" if shaped else ""]
    return "weights: " + ", ".join(p for p in parts if p) if any(parts) else "the weights do not load"


def checkpoint_config(ckpt: dict, config: str | None, overrides: list[str], base: str | None = None) -> Config:
    """The config a checkpoint was trained with (`--config` instead when given), the overrides on top. `base`: the
    folder its relative data roots are resolved against (training_folder), before the overrides, which are the
    current folder's."""
    if config is None and "config" in ckpt:
        raw = ckpt["config"]
        raw["model"]["pretrained"] = ""  # the checkpoint holds the weights; the init file may be gone
        data = raw.get("data", {})
        for key in ("source_root", "target_root", "synthetic_root"):
            if base and data.get(key) and not os.path.isabs(data[key]):
                data[key] = os.path.join(base, data[key])
        for text in overrides:
            (section, key), value = parse_override(text)
            raw.setdefault(section, {})[key] = value
        return config_from_dict(raw)
    return load_config(config, overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsp_fast.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint written by a dsp_fast trainer, or a run folder (its newest good one)")
    parser.add_argument("--config", default=None, help="YAML preset (default: the config saved in the checkpoint)")
    parser.add_argument("--which", default="student", choices=["student", "teacher"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--json", default=None, help="also write the IoU figures to this JSON file")
    add_inference_flags(parser)
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides")
    flags, overrides = split_overrides(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(flags)
    args.overrides = [*args.overrides, *overrides]
    try:
        path, ckpt = open_checkpoint(args.checkpoint)
        base = training_folder(path) if args.config is None else None
        cfg = checkpoint_config(ckpt, args.config, args.overrides, base)
        how = inference_from_flags(args, cfg)
        device = resolve_device(args.device, "--device")
        model = load_checkpoint_model(cfg, ckpt, path, args.which, device)
        dataset = target_dataset(cfg, cfg.data.eval_split, labels=True)
    except (ConfigError, InputError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    moved = base and os.path.abspath(base) != os.getcwd()
    where = f" (the run's relative data paths resolved against {base}, where it ran)" if moved else ""
    print(f"evaluating the {cfg.data.eval_split} split of {os.path.abspath(dataset_roots(cfg)[1])}{where}, "
          f"{how.describe()}")
    t0 = time.time()
    iou = iou_from_confusion(evaluate(model, dataset, cfg.data.eval_size, cfg.model.num_classes, device,
                                      cfg.data.max_eval_images, how))
    print(format_iou_table(iou))
    print(f"evaluated {len(dataset) if not cfg.data.max_eval_images else cfg.data.max_eval_images} images "
          f"in {time.time() - t0:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"iou": iou.tolist(), **miou_variants(iou),
                       "classes_evaluated": int((~torch.isnan(iou)).sum())}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
