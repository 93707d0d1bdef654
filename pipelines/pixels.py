"""Where the torch backend gets a prepared image's pixels: decoded from its file at each read, or held in memory.

A small dataset is decoded once: on a 2-core CPU, reading and PNG decoding were 24.6 of the fast step's 119.5 ms
on the built-in synthetic data (550 images, 88 MiB decoded; docs/performance.md), and a read-ahead thread only
moves that work onto the cores the step computes on. `build_loaders(cache_mib=...)` decodes each set that fits the
budget when the loader is built and cuts the crops from memory after: the same `decode`, so the same batches bit
for bit. A set that does not fit (GTA5 prepared at 1280x720 decodes to about 86 GiB) is read from its files at
each step. The budget is per process (DataLoader workers started by fork share their parent's copy).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from dsp_fast.data.errors import DatasetError

from . import prepared

# What PIL raises on a corrupt or truncated file.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def decode(data: np.ndarray, path: str, gray: bool) -> np.ndarray:
    """PIL decode of checked bytes: uint8 HxW (gray) or HxWx3 RGB; DatasetError naming `path` if corrupt."""
    try:
        with Image.open(io.BytesIO(data.tobytes())) as im:
            return np.asarray(im if gray else im.convert("RGB"))
    except _DECODE_ERRORS as e:
        raise DatasetError(f"{path}: corrupt or truncated image ({e})") from None


class FilePixels:
    """Each read opens, checks and decodes the file (a bad file is named at the step that draws it)."""

    def __init__(self, ds: prepared.PreparedSet) -> None:
        self.ds = ds

    def image(self, i: int) -> np.ndarray:
        path = self.ds.image_path(i)
        return decode(prepared.read_checked(path, self.ds.size), path, gray=False)

    def label(self, i: int) -> np.ndarray:
        path = self.ds.label_path(i)
        return decode(prepared.read_checked(path, self.ds.size, gray8=True), path, gray=True)


class MemoryPixels(FilePixels):
    """Every image of the set (and label, if `labels`) decoded once, at construction (a bad file is named then)."""

    def __init__(self, ds: prepared.PreparedSet, labels: bool) -> None:
        super().__init__(ds)
        read_image, read_label = super().image, super().label  # the file reads this class replaces
        self._images = [read_image(i) for i in range(len(ds))]
        self._labels = [read_label(i) for i in range(len(ds))] if labels else None

    def image(self, i: int) -> np.ndarray:
        return self._images[i]

    def label(self, i: int) -> np.ndarray:
        if self._labels is None:
            raise ValueError(f"{self.ds.root}: its labels are not held (read without labels)")
        return self._labels[i]


def decoded_mib(ds: prepared.PreparedSet, labels: bool) -> float:
    """The set's decoded size in MiB: RGB images, plus 8-bit labels if `labels`."""
    w, h = ds.size
    return len(ds) * w * h * (4 if labels else 3) / 2**20
