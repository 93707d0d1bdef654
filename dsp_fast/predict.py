"""Segment images with a trained checkpoint: colour PNGs and the Cityscapes benchmark's submission format.

    python -m dsp_fast.predict --checkpoint RUN/ckpt_<step>.pt|RUN INPUTS... --out DIR [--model student|teacher]
        [--mode whole|slide] [--window W H] [--stride W H] [--flip]

INPUTS are image files or folders (searched recursively for .png / .jpg / .jpeg), of any size and colour mode
(gray, palette, RGBA and 16-bit images are converted to 8-bit RGB). Each image gets
`DIR/labelIds/<name>.png` (Cityscapes label ids, the benchmark's format) and `DIR/color/<name>.png`, <name> being its
path below the folder given (its file name for a file given alone), so the benchmark's city folders and names are
kept; docs/evaluate.md, "Predict". Exit code 2: missing or unreadable checkpoint or image, no image found, bad
config; the file named.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dsp_fast.atomic_io import atomic_write
from dsp_fast.config import ConfigError, split_overrides
from dsp_fast.data import DatasetError, resize_image
from dsp_fast.data.labels import CITYSCAPES_PALETTE, train_id_to_cityscapes19, train_id_to_label_id
from dsp_fast.data.pngio import read_rgb
from dsp_fast.evaluate import InputError, checkpoint_config, load_checkpoint_model, open_checkpoint
from dsp_fast.inference import Inference, add_inference_flags, inference_from_flags, predict_batch
from dsp_fast.run_io import resolve_device

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def collect_inputs(inputs: list[str]) -> list[tuple[str, str]]:
    """(image path, output name) of every input: a file as its own name, a folder's images (recursively, sorted)
    by their path below it. Two inputs that would write the same output name are an InputError."""
    found: list[tuple[str, str]] = []
    for item in inputs:
        if os.path.isfile(item):
            found.append((item, os.path.basename(item)))
        elif os.path.isdir(item):
            below = []
            for folder, dirs, files in os.walk(item):
                dirs.sort()
                below += [os.path.join(folder, f) for f in sorted(files) if f.lower().endswith(IMAGE_SUFFIXES)]
            if not below:
                raise InputError(f"{item}: no image (.png, .jpg, .jpeg) in this folder or below it")
            found += [(p, os.path.relpath(p, item)) for p in below]
        else:
            raise InputError(f"{item}: no such image file or folder")
    names: dict[str, str] = {}
    for path, name in found:
        key = output_name(name)
        if key in names:
            raise InputError(f"{path} and {names[key]} would both be written as {key}; give them separately")
        names[key] = path
    return found


def output_name(name: str) -> str:
    return os.path.splitext(name)[0] + ".png"


def _save(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


def predict_files(model: torch.nn.Module, files: list[tuple[str, str]], out_dir: str, num_classes: int,
                  eval_size: tuple[int, int], device: torch.device, batch_size: int = 4, keep_size: bool = True,
                  progress: bool = True, how: Inference = Inference()) -> int:
    """Write the labelIds and colour PNGs of `files` (from collect_inputs) under `out_dir`; returns the count.
    Each image is resized to `eval_size` and segmented as `how` says (whole, slide, flip). Images are read and
    PNGs written by threads while the model runs on the next batch."""
    to_label_id = train_id_to_label_id(num_classes)
    colours = CITYSCAPES_PALETTE[train_id_to_cityscapes19(num_classes)]
    model.eval()
    batches = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool, \
            tqdm(total=len(files), unit="img", desc="predict", disable=not progress) as bar:
        pending = []
        read_next = pool.map(read_rgb, [p for p, _ in batches[0]]) if batches else None
        for k, batch in enumerate(batches):
            images = list(read_next)
            if k + 1 < len(batches):
                read_next = pool.map(read_rgb, [p for p, _ in batches[k + 1]])
            sizes = [(im.shape[1], im.shape[0]) for im in images]
            preds = predict_batch(model, [resize_image(im, eval_size) for im in images], device,
                                  sizes if keep_size else None, how)
            for (_, name), pred in zip(batch, preds):
                ids = pred.to(torch.uint8).cpu().numpy()
                pending.append(pool.submit(_save, os.path.join(out_dir, "labelIds", output_name(name)),
                                           to_label_id[ids]))
                pending.append(pool.submit(_save, os.path.join(out_dir, "color", output_name(name)), colours[ids]))
            bar.update(len(batch))
        for f in pending:
            f.result()  # a failed write raises here
    return len(files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsp_fast.predict", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint written by a dsp_fast trainer, or a run folder (its newest good one)")
    parser.add_argument("inputs", nargs="+", help="image files or folders (a Cityscapes split folder)")
    parser.add_argument("--out", required=True, help="output folder (labelIds/ and color/ below it)")
    parser.add_argument("--model", default="student", choices=["student", "teacher"],
                        help="which of the checkpoint's models segments (default: the student, the one scored)")
    parser.add_argument("--config", default=None, help="YAML preset (default: the config saved in the checkpoint)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward")
    parser.add_argument("--size", default="original", choices=["original", "eval"],
                        help="write each prediction at its image's size (default) or at data.eval_size")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_inference_flags(parser)
    flags, overrides = split_overrides(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(flags)
    try:
        if args.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
        files = collect_inputs(args.inputs)
        path, ckpt = open_checkpoint(args.checkpoint)
        cfg = checkpoint_config(ckpt, args.config, overrides)
        how = inference_from_flags(args, cfg)
        device = resolve_device(args.device, "--device")
        model = load_checkpoint_model(cfg, ckpt, path, args.model, device)
        n = predict_files(model, files, args.out, cfg.model.num_classes, cfg.data.eval_size, device,
                          args.batch_size, keep_size=args.size == "original", progress=not args.no_progress, how=how)
    except (ConfigError, InputError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out)
    print(f"{n} images segmented by the {args.model} of {path} ({cfg.model.arch}, {device}, {how.describe()}):\n"
          f"  {os.path.join(out, 'labelIds')}  Cityscapes label ids (the benchmark's submission format)\n"
          f"  {os.path.join(out, 'color')}  Cityscapes colours")
    return 0


if __name__ == "__main__":
    sys.exit(main())
