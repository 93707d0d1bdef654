"""Resizing shared by the reference trainer and the one-time preparation step, so both resize the same way.

Images use PIL's bicubic filter for the synthetic sources (GTA5, SYNTHIA: the authors' loaders) and bilinear for
Cityscapes; both widen their support when shrinking (they antialias, like torchvision's `antialias=True`). Labels
use PIL's nearest neighbour, which only ever copies existing ids.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    w, h = (int(v) for v in size)
    if w <= 0 or h <= 0:
        raise ValueError(f"size must be a positive (width, height), got {size!r}")
    return w, h


RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
SOURCE_RESAMPLE = "bicubic"  # GTA5 / SYNTHIA and the synthetic source


def resize_image(img_HWC: np.ndarray, size: tuple[int, int], resample: str = "bilinear") -> np.ndarray:
    """Resize a uint8 HxWx3 image to (width, height) with PIL `resample` ('bilinear' or 'bicubic'); a no-op copy
    when already that size."""
    w, h = _check_size(size)
    if resample not in RESAMPLE:
        raise ValueError(f"resample must be one of {sorted(RESAMPLE)}, got {resample!r}")
    if img_HWC.dtype != np.uint8 or img_HWC.ndim != 3:
        raise ValueError(f"expected a uint8 HxWxC image, got {img_HWC.dtype} with shape {img_HWC.shape}")
    if img_HWC.shape[1] == w and img_HWC.shape[0] == h:
        return img_HWC.copy()
    return np.asarray(Image.fromarray(img_HWC).resize((w, h), RESAMPLE[resample]))


def resize_label(label_HW: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an integer HxW label to (width, height) with nearest neighbour; keeps the dtype, never new ids."""
    w, h = _check_size(size)
    if label_HW.ndim != 2 or not np.issubdtype(label_HW.dtype, np.integer):
        raise ValueError(f"expected an integer HxW label, got {label_HW.dtype} with shape {label_HW.shape}")
    if label_HW.shape[1] == w and label_HW.shape[0] == h:
        return label_HW.copy()
    lo, hi = (int(label_HW.min()), int(label_HW.max())) if label_HW.size else (0, 0)
    # 8-bit when the ids fit (the common case, 0..18 and 255); PIL's 32-bit 'I' mode otherwise.
    if 0 <= lo and hi <= 255:
        pil = Image.fromarray(label_HW.astype(np.uint8))
    elif -(2**31) <= lo and hi < 2**31:
        pil = Image.fromarray(label_HW.astype(np.int32))
    else:
        raise ValueError(f"label ids {lo}..{hi} do not fit 32 bits")
    return np.asarray(pil.resize((w, h), Image.Resampling.NEAREST)).astype(label_HW.dtype)
