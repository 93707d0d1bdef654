"""The prepared training format: what `python -m dsp_fast.prepare` writes and the loaders read.

One prepared set (a dataset, or one Cityscapes split) is a folder:

    images/<stem>.jpg | .png   RGB at the dataset's base size (JPEG: GPU-decodable baseline; PNG: lossless)
    labels/<stem>.png          8-bit grayscale train ids, 255 = ignore (never a palette: DALI expands palettes)
    stats/<stem>.json          per-image sidecar, written last: its presence marks the image as done (resume)
    manifest.json              the set: stems in order, sizes, per-class pixel counts, class -> images, rejects
    index.npz                  counts (N, C) int32 pixels per class; in a longtail/ set also window_counts (N, C)
                               int64: the crop windows (manifest "crop") that hold each long-tail class
    windows/<stem>.npz         a longtail/ set only: per long-tail class the image holds, its valid-window map
                               (dsp_fast.data.windows.valid_window_box), bit-packed, so the loader draws a window
                               without decoding the 1920x1080 label
    rejects.txt                input files that could not be read, one per line with the error
    longtail/                  a source set only: the images holding a long-tail class, at the long-tail size
                               (1920x1080), as a prepared set of its own (manifest "long_tail" names it)

The manifest is rebuilt from the sidecars at the end of every run, so an interrupted run loses no finished image.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
from typing import Any

import numpy as np
from PIL import Image

from dsp_fast.atomic_io import atomic_write
from dsp_fast.data.errors import DatasetError
from dsp_fast.data.pngio import PNG_SIGNATURE

FORMAT_VERSION = 3  # 2: bicubic source images, longtail/ subset with window counts; 3: and window maps
MANIFEST = "manifest.json"
LONG_TAIL_DIR = "longtail"
INDEX = "index.npz"
REJECTS = "rejects.txt"
OPTIONS = "prepare_options.json"  # the options an output folder was started with; a resume must match them
IMAGE_EXT = {"jpeg": ".jpg", "png": ".png"}


def image_path(root: str, stem: str, fmt: str) -> str:
    return os.path.join(root, "images", stem + IMAGE_EXT[fmt])


def label_path(root: str, stem: str) -> str:
    return os.path.join(root, "labels", stem + ".png")


def stats_path(root: str, stem: str) -> str:
    return os.path.join(root, "stats", stem + ".json")


def windows_path(root: str, stem: str) -> str:
    return os.path.join(root, "windows", stem + ".npz")


def encode_window_maps(maps: dict[int, tuple[np.ndarray, int, int]]) -> bytes:
    """{class: (valid (h, w) bool, y_lo, x_lo)} as one compressed npz: the bits and [y_lo, x_lo, h, w] per class."""
    arrays = {}
    for c, (valid, y_lo, x_lo) in maps.items():
        arrays[f"bits_{c}"] = np.packbits(valid, axis=None)
        arrays[f"box_{c}"] = np.array([y_lo, x_lo, *valid.shape], dtype=np.int64)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def read_window_map(ds: PreparedSet, i: int, cls: int) -> tuple[np.ndarray, int, int]:
    """The stored valid-window map of class `cls` in image i of a longtail/ set: (valid (h, w) bool, y_lo, x_lo)."""
    path = windows_path(ds.root, ds.stems[i])
    try:
        with np.load(path) as z:
            y_lo, x_lo, h, w = (int(v) for v in z[f"box_{cls}"])
            valid = np.unpackbits(z[f"bits_{cls}"], count=h * w).astype(bool).reshape(h, w)
    except KeyError:
        raise DatasetError(f"{path}: no window map of class {cls}; rerun python -m dsp_fast.prepare") from None
    except (OSError, ValueError, EOFError) as e:
        raise DatasetError(f"{path}: unreadable window maps ({e}); rerun python -m dsp_fast.prepare") from None
    return valid, y_lo, x_lo




def build_manifest(root: str, options: dict[str, Any], stems: list[str], rejects: list[dict[str, str]],
                   long_tail: str | None = None) -> dict:
    """Gather the finished images' sidecars (in `stems` order) into manifest.json + index.npz; return the manifest.
    long_tail: the subfolder of this source set's longtail/ set, if it has one."""
    num_classes = options["num_classes"]
    has_labels = options["labels"]
    counts = np.zeros((len(stems), num_classes), dtype=np.int32)
    windows = np.zeros((len(stems), num_classes), dtype=np.int64)
    source_sizes = []
    for i, stem in enumerate(stems):
        with open(stats_path(root, stem)) as f:
            side = json.load(f)
        source_sizes.append(side["source_size"])
        if has_labels:
            counts[i] = side["counts"]
            for c, n in side.get("windows", {}).items():
                windows[i, int(c)] = n
    manifest = {
        **options,
        "format_version": FORMAT_VERSION,
        "image_ext": IMAGE_EXT[options["format"]],
        "stems": stems,
        "source_sizes": source_sizes,
        "class_pixels": counts.sum(0, dtype=np.int64).tolist(),
        "class_images": [np.flatnonzero(counts[:, c]).tolist() for c in range(num_classes)] if has_labels else [],
        "rejects": rejects,
        "long_tail": long_tail,
    }
    arrays = {"counts": counts, **({"window_counts": windows} if options.get("is_long_tail") else {})}
    buf_path = os.path.join(root, INDEX)
    atomic_write(buf_path, lambda f: np.savez_compressed(f, **arrays))
    atomic_write(os.path.join(root, MANIFEST), json.dumps(manifest).encode())
    lines = [f"{r['path']}\t{r['error']}" for r in rejects]
    atomic_write(os.path.join(root, REJECTS), ("\n".join(lines) + "\n" if lines else "").encode())
    return manifest


@dataclasses.dataclass
class PreparedSet:
    """A prepared folder, read back: what the loaders need to plan crops on the host."""

    root: str
    size: tuple[int, int]  # (width, height) of every image and label
    format: str  # 'jpeg' or 'png'
    num_classes: int
    stems: list[str]
    has_labels: bool
    crop: tuple[int, int]  # (width, height) the window counts are for
    window_counts: np.ndarray | None  # (N, C) int64 windows holding each class (a longtail/ set), else None
    long_tail_classes: list[int]  # the classes whose windows were counted (prepare --long-tail-classes)
    long_tail: str | None  # the longtail/ set's folder (a source set prepared with one), else None

    def __len__(self) -> int:
        return len(self.stems)

    def image_path(self, i: int) -> str:
        return image_path(self.root, self.stems[i], self.format)

    def label_path(self, i: int) -> str:
        return label_path(self.root, self.stems[i])


def load_prepared(root: str) -> PreparedSet:
    """Read a prepared folder; a missing or foreign folder raises DatasetError naming what is wrong and the fix."""
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: no manifest; prepare the data first (python -m dsp_fast.prepare --help)")
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable manifest ({e}); rerun python -m dsp_fast.prepare") from None
    if m.get("format_version") != FORMAT_VERSION:
        raise DatasetError(f"{path}: format version {m.get('format_version')}, this code reads {FORMAT_VERSION}; "
                           "rerun python -m dsp_fast.prepare into a new folder")
    if not m["stems"]:
        raise DatasetError(f"{path}: the prepared set holds no images")
    index_file = os.path.join(root, INDEX)
    try:
        with np.load(index_file) as z:
            windows = z["window_counts"] if m.get("is_long_tail") else None
    except (OSError, KeyError, ValueError) as e:
        raise DatasetError(f"{index_file}: unreadable class index ({e}); rerun python -m dsp_fast.prepare") from None
    long_tail = os.path.join(os.path.abspath(root), m["long_tail"]) if m.get("long_tail") else None
    return PreparedSet(root=os.path.abspath(root), size=tuple(m["size"]), format=m["format"],
                       num_classes=m["num_classes"], stems=m["stems"], has_labels=m["labels"], crop=tuple(m["crop"]),
                       window_counts=windows, long_tail_classes=list(m["long_tail_classes"]), long_tail=long_tail)


# --------------------------------------------------------------------------------------------- encoded sizes
# JPEG start-of-frame markers (baseline, extended, progressive, lossless, arithmetic variants) carry the size.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def encoded_size(data: bytes | np.ndarray, path: str) -> tuple[int, int]:
    """(width, height) read from a PNG or JPEG header without decoding; DatasetError naming `path` if unreadable.
    The loaders call it on every file, so a bad file is named on the host before a decoder (DALI's errors do not
    know file names) sees it."""
    buf = memoryview(data)  # no copy of a whole file to read its header
    head = bytes(buf[:26])
    if head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR":
        w, h = struct.unpack(">II", head[16:24])
        return int(w), int(h)
    if head[:2] == b"\xff\xd8":
        pos = 2
        while pos + 9 < len(buf):
            if buf[pos] != 0xFF:
                break
            marker = buf[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            seg_len = struct.unpack(">H", buf[pos + 2:pos + 4])[0]
            if marker in _SOF:
                h, w = struct.unpack(">HH", buf[pos + 5:pos + 9])
                return int(w), int(h)
            pos += 2 + seg_len
        raise DatasetError(f"{path}: corrupt JPEG (no frame header found)")
    raise DatasetError(f"{path}: not a PNG or JPEG file (corrupt or foreign)")


def check_size(data: bytes | np.ndarray, path: str, expected: tuple[int, int]) -> None:
    """DatasetError naming `path` unless its header says `expected` (width, height)."""
    got = encoded_size(data, path)
    if got != tuple(expected):
        raise DatasetError(f"{path}: {got[0]}x{got[1]} but the prepared set's size is {expected[0]}x{expected[1]} "
                           "(width x height); the file was replaced or the folder mixes two preparations")


def check_gray8(data: bytes | np.ndarray, path: str) -> None:
    """DatasetError naming `path` unless it is an 8-bit grayscale PNG: a palette or colour label decodes to colours
    in DALI (the palette indices, i.e. the class ids, would be lost)."""
    head = bytes(memoryview(data)[:26])
    if len(head) < 26 or head[:8] != PNG_SIGNATURE or head[24] != 8 or head[25] != 0:
        raise DatasetError(f"{path}: not an 8-bit grayscale PNG label (prepared labels are 'L' train-id PNGs)")


_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the empty IEND chunk every PNG ends with
_JPEG_END = b"\xff\xd9"  # the end-of-image marker


def check_complete(data: bytes | np.ndarray, path: str) -> None:
    """DatasetError naming `path` unless the file ends as a whole PNG or JPEG does. A region decode stops after the
    window's last row, so a file cut below the window would decode without complaint: the check on the host keeps
    a truncated file an error whatever window is drawn (preparation writes files whole: a cut one is damage)."""
    head, tail = bytes(memoryview(data)[:2]), bytes(memoryview(data)[-12:])
    if not tail.endswith(_PNG_END if head == PNG_SIGNATURE[:2] else _JPEG_END):
        raise DatasetError(f"{path}: truncated file (no end marker); rerun python -m dsp_fast.prepare")


def read_label_array(ds: PreparedSet, i: int) -> np.ndarray:
    """Label i of a prepared set, decoded on the host: (H, W) uint8 train ids."""
    path = ds.label_path(i)
    data = read_checked(path, ds.size, gray8=True)
    try:
        with Image.open(io.BytesIO(data.tobytes())) as im:
            return np.asarray(im)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DatasetError(f"{path}: corrupt or truncated label ({e})") from None


def read_checked(path: str, size: tuple[int, int], gray8: bool = False) -> np.ndarray:
    """A prepared file's bytes, after checking its header (size, and 8-bit gray for labels) and its end marker:
    DatasetError naming the path otherwise. Both backends read through here, so they reject the same files the
    same way."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found (the prepared folder is incomplete: rerun prepare)") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e})") from None
    check_size(data, path, size)
    check_complete(data, path)
    if gray8:
        check_gray8(data, path)
    return data
