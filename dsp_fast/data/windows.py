"""Crop windows that hold a class: the long-tail sampler's distribution without the authors' retry loop.

The authors redraw (image of the class's list, uniform window) until the window holds a pixel of the class. Every
image has the same number of windows, so a success is drawn with probability proportional to [window holds the
class]: the image in proportion to its number of valid windows, then a window uniformly among them. Preparation
stores each (image, long-tail class)'s valid-window map restricted to the windows that can reach the class
(`valid_window_box`, from a summed-area table), so the loader draws from it (`draw_in_box`) without decoding the
label: bit for bit the draw of `draw_valid_window` on the label.

Shapes: label (H, W) integer ids; crop (width, height); windows indexed by their top-left corner (y0, x0), a
(H - ch + 1, W - cw + 1) grid.
"""

from __future__ import annotations

import numpy as np


def valid_window_box(label_HW: np.ndarray, cls: int, crop: tuple[int, int]) -> tuple[np.ndarray, int, int]:
    """(valid, y_lo, x_lo): the valid-window map restricted to the windows that can reach the class's bounding box
    (every other window is invalid), and the top-left corner of that sub-grid. Working on the box keeps a small
    object's search small in a 1920x1080 label."""
    cw, ch = crop
    h, w = label_HW.shape
    if cw > w or ch > h:
        raise ValueError(f"crop {cw}x{ch} is larger than the label {w}x{h}")
    hit = label_HW == cls
    rows, cols = np.flatnonzero(hit.any(axis=1)), np.flatnonzero(hit.any(axis=0))
    if len(rows) == 0:
        return np.zeros((0, 0), dtype=bool), 0, 0
    y_lo, y_hi = max(0, int(rows[0]) - ch + 1), min(h - ch, int(rows[-1]))
    x_lo, x_hi = max(0, int(cols[0]) - cw + 1), min(w - cw, int(cols[-1]))
    sub = hit[y_lo:y_hi + ch, x_lo:x_hi + cw]
    table = np.zeros((sub.shape[0] + 1, sub.shape[1] + 1), dtype=np.int32)  # < 2**31 pixels in any label
    np.cumsum(np.cumsum(sub, axis=0, dtype=np.int32), axis=1, out=table[1:, 1:])
    hits = table[ch:, cw:] - table[:-ch, cw:] - table[ch:, :-cw] + table[:-ch, :-cw]
    return hits > 0, y_lo, x_lo


def valid_windows(label_HW: np.ndarray, cls: int, crop: tuple[int, int]) -> np.ndarray:
    """(H - ch + 1, W - cw + 1) bool: window with top-left (y0, x0) holds at least one pixel of `cls`."""
    cw, ch = crop
    h, w = label_HW.shape
    sub, y_lo, x_lo = valid_window_box(label_HW, cls, crop)
    out = np.zeros((h - ch + 1, w - cw + 1), dtype=bool)
    out[y_lo:y_lo + sub.shape[0], x_lo:x_lo + sub.shape[1]] = sub
    return out


def draw_valid_window(rng: np.random.Generator, label_HW: np.ndarray, cls: int, crop: tuple[int, int]
                      ) -> tuple[int, int]:
    """Top-left (y0, x0) of a window drawn uniformly among those holding `cls` (ValueError when there is none)."""
    sub, y_lo, x_lo = valid_window_box(label_HW, cls, crop)
    if not sub.any():
        raise ValueError(f"no {crop[0]}x{crop[1]} window holds class {cls}")
    return draw_in_box(rng, sub, y_lo, x_lo)


def draw_in_box(rng: np.random.Generator, valid_hw: np.ndarray, y_lo: int, x_lo: int) -> tuple[int, int]:
    """Top-left (y0, x0) of a window drawn uniformly among the True cells of a `valid_window_box` map."""
    flat = np.flatnonzero(valid_hw)
    dy, dx = np.divmod(int(flat[int(rng.integers(len(flat)))]), valid_hw.shape[1])
    return y_lo + int(dy), x_lo + int(dx)
