"""How one image becomes train ids, shared by `evaluate` and `predict`: whole or sliding-window inference at the
evaluation scale, optionally averaged with the horizontally flipped input (docs/evaluate.md, "Inference modes").

- whole: the (resized) image in one forward, the logits upsampled to the output size;
- slide: windows of `window` pixels every `stride` pixels over the image at the evaluation scale, the last one
  aligned to the border, all windows of a batch in one forward; each window's logits are upsampled to the window,
  summed onto the image and divided by the number of windows covering each pixel (mmseg's `slide_inference`); a
  side shorter than the window is one window of that side's length (no padding); the result is then resized to the
  output size;
- flip: the same on the horizontally mirrored input, mirrored back at the output size, and the two logits averaged.

Sizes are (width, height), as every size of the config. Legend: B images, N windows, K classes.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from dsp_fast.config import Config, ConfigError
from dsp_fast.models import normalize_input, unwrap

MODES = ("whole", "slide")


@dataclasses.dataclass(frozen=True)
class Inference:
    """How the evaluation and the predictions segment an image (the default: whole, no flip, as training's
    periodic evaluation does)."""

    mode: str = "whole"
    window: tuple[int, int] = (512, 512)
    """Slide: (width, height) of a window at the evaluation scale."""
    stride: tuple[int, int] = (341, 341)
    """Slide: (width, height) step between windows; at most the window, so that every pixel is covered."""
    flip: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"--mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        for name, (w, h) in (("--window", self.window), ("--stride", self.stride)):
            if w < 1 or h < 1:
                raise ConfigError(f"{name}: expected two positive integers W H, got {w} {h}")
        if self.stride[0] > self.window[0] or self.stride[1] > self.window[1]:
            raise ConfigError(f"--stride {self.stride[0]} {self.stride[1]} is larger than --window {self.window[0]} "
                              f"{self.window[1]}: pixels between the windows would get no prediction")

    def describe(self) -> str:
        how = (f"slide, window {self.window[0]}x{self.window[1]}, stride {self.stride[0]}x{self.stride[1]}"
               if self.mode == "slide" else "whole")
        return how + (", flip" if self.flip else "")


def add_inference_flags(parser: argparse.ArgumentParser) -> None:
    """--mode, --window, --stride, --flip: the same flags in evaluate and predict."""
    parser.add_argument("--mode", default="whole", choices=MODES,
                        help="whole image in one forward (default) or sliding windows, at data.eval_size")
    parser.add_argument("--window", type=int, nargs=2, metavar=("W", "H"), default=None,
                        help="slide: window width and height at data.eval_size (default: data.crop_size)")
    parser.add_argument("--stride", type=int, nargs=2, metavar=("W", "H"), default=None,
                        help="slide: step between windows (default: 2/3 of the window, rounded down, as mmseg's "
                             "512 -> 341)")
    parser.add_argument("--flip", action="store_true",
                        help="also segment the mirrored image and average the logits")


def inference_from_flags(args: argparse.Namespace, cfg: Config) -> Inference:
    """The Inference the flags ask for; the window defaults to the training crop (data.crop_size)."""
    if args.mode == "whole" and (args.window or args.stride):
        raise ConfigError("--window and --stride set the sliding windows; add --mode slide")
    window = tuple(args.window or cfg.data.crop_size)
    stride = tuple(args.stride or (max(1, window[0] * 2 // 3), max(1, window[1] * 2 // 3)))
    return Inference(args.mode, window, stride, args.flip)


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start of every window along one side: every `stride`, the last aligned to the border (mmseg's grid)."""
    window = min(window, size)
    count = max(size - window + stride - 1, 0) // stride + 1
    return [min(i * stride, size - window) for i in range(count)]


@torch.no_grad()
def slide_logits(model: torch.nn.Module, x_BCHW: torch.Tensor, window: tuple[int, int],
                 stride: tuple[int, int]) -> torch.Tensor:
    """Logits (B, K, H, W) at the input's size: the windows of every image in one forward, overlaps averaged."""
    height, width = x_BCHW.shape[-2:]
    win_h, win_w = min(window[1], height), min(window[0], width)
    corners = [(y, x) for y in window_starts(height, win_h, stride[1]) for x in window_starts(width, win_w, stride[0])]
    crops_BNCHW = torch.stack([x_BCHW[:, :, y:y + win_h, x:x + win_w] for y, x in corners], 1)
    logits, _ = model(crops_BNCHW.flatten(0, 1))
    logits = _resize(logits, (win_h, win_w), unwrap(model).logits_align_corners)
    logits_BNKhw = logits.unflatten(0, (len(x_BCHW), len(corners)))
    total = logits.new_zeros(len(x_BCHW), logits.shape[1], height, width)
    count = logits.new_zeros(height, width)
    for n, (y, x) in enumerate(corners):  # a few windows per image; each adds a whole block
        total[:, :, y:y + win_h, x:x + win_w] += logits_BNKhw[:, n]
        count[y:y + win_h, x:x + win_w] += 1
    return total / count


def _resize(logits: torch.Tensor, size: tuple[int, int], align: bool) -> torch.Tensor:
    """Logits at `size` (height, width); at their own size they are returned as they are (no interpolation)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=align)


@torch.no_grad()
def image_logits(model: torch.nn.Module, x_BCHW: torch.Tensor, sizes_HW: list[tuple[int, int]],
                 how: Inference = Inference()) -> Iterator[torch.Tensor]:
    """Logits (1, K, H, W) of each image of the normalised batch `x_BCHW` at its (height, width) in `sizes_HW`,
    one image at a time (a 2048x1024 frame's 19 logit planes take 160 MB), resized as the model's losses resize
    them (the model class's `logits_align_corners`: DeepLab True, MiT + DAFormer False)."""
    align = unwrap(model).logits_align_corners

    def logits_of(inputs: torch.Tensor) -> torch.Tensor:  # whole: at the model's stride; slide: at the input size
        return slide_logits(model, inputs, how.window, how.stride) if how.mode == "slide" else model(inputs)[0]

    logits = logits_of(x_BCHW)
    mirrored = logits_of(x_BCHW.flip(-1)) if how.flip else None
    for i, size in enumerate(sizes_HW):
        up = _resize(logits[i:i + 1], size, align)
        if mirrored is not None:  # mirrored back at the output size: a bilinear resize commutes with the mirror
            up = (up + _resize(mirrored[i:i + 1], size, align).flip(-1)) / 2
        yield up


@torch.no_grad()
def predict_batch(model: torch.nn.Module, images_uint8_HWC: list[np.ndarray], device: torch.device,
                  out_sizes: list[tuple[int, int]] | None = None, how: Inference = Inference()) -> list[torch.Tensor]:
    """Predictions of equal-size images: train ids (H, W) on the device, at the input size, or at each image's
    `out_sizes` (width, height) entry. The evaluation's preprocessing: [0, 1] floats normalised for the model's
    weights (`input_kind`). `how`: whole or slide, flip or not."""
    x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images_uint8_HWC])
    x = normalize_input(x.float().div(255).to(device), getattr(model, "input_kind", "torchvision"))
    sizes = [tuple(x.shape[-2:])] * len(x) if out_sizes is None else [(h, w) for w, h in out_sizes]
    return [up.argmax(1)[0] for up in image_logits(model, x, sizes, how)]
