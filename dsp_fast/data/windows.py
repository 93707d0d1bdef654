"""Crop windows that hold a class: the long-tail sampler's distribution without the authors' retry loop.

The authors draw a long-tail crop by redrawing (image of the class's list, uniform window) until the window holds
a pixel of the class. Every image has the same number of windows, so, conditional on success, a pair
(image, window) is drawn with probability proportional to [window holds the class]: the image in proportion to
its number of valid windows, then a window uniformly among them. `valid_windows` finds them all at once with a
summed-area table of the class's pixels; `count_valid_windows` is what preparation stores per (image, class).

Shapes: label (H, W) integer ids; crop (width, height); windows indexed by their top-left corner (y0, x0), a
(H - ch + 1, W - cw + 1) grid.
"""

from __future__ import annotations

import numpy as np


def valid_windows(label_HW: np.ndarray, cls: int, crop: tuple[int, int]) -> np.ndarray:
    """(H - ch + 1, W - cw + 1) bool: window with top-left (y0, x0) holds at least one pixel of `cls`."""
    cw, ch = crop
    h, w = label_HW.shape
    if cw > w or ch > h:
        raise ValueError(f"crop {cw}x{ch} is larger than the label {w}x{h}")
    table = np.zeros((h + 1, w + 1), dtype=np.int64)
    np.cumsum(np.cumsum(label_HW == cls, axis=0, dtype=np.int64), axis=1, out=table[1:, 1:])
    hits = table[ch:, cw:] - table[:-ch, cw:] - table[ch:, :-cw] + table[:-ch, :-cw]
    return hits > 0


def count_valid_windows(label_HW: np.ndarray, classes, crop: tuple[int, int]) -> dict[int, int]:
    """{class: number of valid windows} for each class of `classes` present in the label (absent classes left out)."""
    present = set(np.unique(label_HW).tolist())
    return {int(c): int(valid_windows(label_HW, int(c), crop).sum()) for c in classes if int(c) in present}


def draw_valid_window(rng: np.random.Generator, label_HW: np.ndarray, cls: int, crop: tuple[int, int]
                      ) -> tuple[int, int]:
    """Top-left (y0, x0) of a window drawn uniformly among those holding `cls` (ValueError when there is none)."""
    valid = valid_windows(label_HW, cls, crop)
    flat = np.flatnonzero(valid)
    if len(flat) == 0:
        raise ValueError(f"no {crop[0]}x{crop[1]} window holds class {cls}")
    y0, x0 = np.divmod(int(flat[int(rng.integers(len(flat)))]), valid.shape[1])
    return int(y0), int(x0)
