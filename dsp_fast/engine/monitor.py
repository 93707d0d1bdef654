"""What the trainer shows: the progress line and metrics JSONL (run_io.RunLog, rank 0 only), optional TensorBoard
scalars, and an image grid PNG of one step (template, mask, both mixed images, pseudo-label, prediction).
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from dsp_fast.atomic_io import atomic_write
from dsp_fast.config import Config
from dsp_fast.data import class_names
from dsp_fast.data.labels import CITYSCAPES_PALETTE
from dsp_fast.method import dsp_mix, seg_forward
from dsp_fast.models import unwrap
from dsp_fast.run_io import RunLog

PALETTE = CITYSCAPES_PALETTE  # Cityscapes colours of the 19 train ids (the ignore label and anything else: black)


@functools.cache
def _say_tensorboard_missing() -> None:
    """Once per process, on stderr (--print-config's stdout is the YAML alone)."""
    print("TensorBoard off: fast.tensorboard is true but the tensorboard package is not installed "
          "(pip install -e '.[tensorboard]')", file=sys.stderr, flush=True)


def tensorboard_on(wanted: bool | None) -> bool:
    """Whether a run writes TensorBoard scalars: fast.tensorboard true or unset, and the package imports. Missing,
    it is said only when asked for explicitly (true): most runs never wanted it."""
    if wanted is False:
        return False
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        if wanted:
            _say_tensorboard_missing()
        return False
    return True


class FastRunLog(RunLog):
    """RunLog whose config.yaml records what the run resolved (`trainer.resolved_settings`), mirroring scalars to
    TensorBoard when `resolved['tensorboard']`."""

    def __init__(self, cfg: Config, folder: str, title: str, resolved: dict[str, Any]) -> None:
        super().__init__(cfg, folder, title, resolved)
        self._tb = None
        if resolved["tensorboard"]:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(self.dir)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        super().close()


class NullLog:
    """The log of ranks other than 0: they print and write nothing."""

    def start(self, *args: Any, **kwargs: Any) -> None: ...
    def step(self, *args: Any, **kwargs: Any) -> None: ...
    def metrics(self, *args: Any, **kwargs: Any) -> None: ...
    def scalars(self, *args: Any, **kwargs: Any) -> None: ...
    def close(self) -> None: ...


def memory_figures(device: torch.device) -> dict[str, float]:
    """Peak host memory on CPU runs (RunLog itself prints the CUDA peak when a GPU is present)."""
    if device.type == "cuda":
        return {}
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


@contextlib.contextmanager
def preserved_buffers(*models: nn.Module) -> Iterator[None]:
    """A training-mode forward updates BN running statistics; put them back (in place: a CUDA graph holds their
    addresses) so that drawing a picture never changes the run."""
    saved = [(b, b.detach().clone()) for m in models for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, copy in saved:
                b.copy_(copy)


def _rgb(x_3HW: torch.Tensor) -> np.ndarray:
    return (x_3HW.float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def _colour(label_HW: torch.Tensor) -> np.ndarray:
    return PALETTE[label_HW.clamp(0, 255).byte().cpu().numpy()]


# captions of the image grid's columns, left to right
GRID_COLUMNS = ("template + long-tail", "mask M (white: pasted)", "mixed source", "mixed target",
                "pseudo-label (teacher)", "prediction (student)")
CAPTION_H, _SWATCH, _LEGEND_ROW = 14, 10, 14


def labelled_grid(rows: list[list[np.ndarray]], class_names: list[str]) -> Image.Image:
    """The grid of `rows` (equal-size RGB tiles, one list per image), with a caption above each column and a
    colour legend of the classes below (black: ignore / no class)."""
    tile_h, tile_w = rows[0][0].shape[:2]
    body = np.concatenate([np.concatenate(tiles, axis=1) for tiles in rows], axis=0)
    width = body.shape[1]
    font = ImageFont.load_default()
    entries = [(name, tuple(int(v) for v in PALETTE[i])) for i, name in enumerate(class_names)]
    entries.append(("ignore", (0, 0, 0)))
    entry_w = _SWATCH + 4 + 6 * max(len(n) for n, _ in entries) + 8
    per_row = max(1, width // entry_w)
    legend_rows = -(-len(entries) // per_row)
    canvas = Image.new("RGB", (width, CAPTION_H + body.shape[0] + 4 + legend_rows * _LEGEND_ROW), (255, 255, 255))
    canvas.paste(Image.fromarray(body), (0, CAPTION_H))
    draw = ImageDraw.Draw(canvas)
    for c, caption in enumerate(GRID_COLUMNS[: width // tile_w]):
        draw.text((c * tile_w + 2, 1), caption, fill=(0, 0, 0), font=font)  # clipped by the next column's text
    top = CAPTION_H + body.shape[0] + 4
    for k, (name, colour) in enumerate(entries):
        x, y = (k % per_row) * entry_w + 2, top + (k // per_row) * _LEGEND_ROW
        draw.rectangle((x, y + 1, x + _SWATCH, y + 1 + _SWATCH), fill=colour, outline=(128, 128, 128))
        draw.text((x + _SWATCH + 4, y), name, fill=(0, 0, 0), font=font)
    return canvas


@torch.no_grad()
def save_image_grid(path: str, ctx, buf) -> None:
    """One row per image of the step held in `buf` (the GRID_COLUMNS, the prediction on the mixed target), captions
    and a class legend; drawn after the step's update."""
    student = unwrap(ctx.student)  # the module itself: no DDP hooks for a picture
    with preserved_buffers(student, ctx.teacher):
        mix = dsp_mix(ctx.cfg, ctx.teacher, ctx.normalize, buf.x_s, buf.y_s, buf.x_m, buf.y_m, buf.x_t,
                      buf.choices)
        pred = seg_forward(student, mix.xt_mix, ctx.normalize)[0].argmax(1)
    rows = []
    for b in range(buf.x_s.shape[0]):
        m = mix.mask[b].byte().cpu().numpy()[..., None].repeat(3, axis=2) * 255
        rows.append([_rgb(mix.x_m[b]), m, _rgb(mix.xs_mix[b]), _rgb(mix.xt_mix[b]), _colour(mix.yhat_t[b]),
                     _colour(pred[b])])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    grid = labelled_grid(rows, class_names(ctx.cfg.model.num_classes))
    atomic_write(path, lambda f: grid.save(f, format="PNG"))
