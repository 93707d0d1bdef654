"""Small datasets written on disk for the data tests: GTA5- and Cityscapes-layout folders of drawn label ids, the
preparation command run on them at small sizes, and a writer of 16-bit PNGs for SYNTHIA-style files (PIL cannot
write 16-bit colour PNGs), with any row filter per row, so that `dsp_fast.data.pngio.decode_png16` is tested
against every filter."""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
from PIL import Image

from dsp_fast import prepare
from dsp_fast.data.pngio import PNG_SIGNATURE


def encode_png16(arr: np.ndarray, filters: np.ndarray | list[int] | None = None) -> bytes:
    """Encode uint16 HxW or HxWxC (C = 1..4) as a 16-bit PNG; filters: the row filter (0..4) of each row (default 0)."""
    arr = np.asarray(arr, dtype=np.uint16)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    height, width, channels = arr.shape
    ctype = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    bpp = 2 * channels
    cur = arr.astype(">u2").view(np.uint8).reshape(height, width, bpp).astype(np.int16)
    up = np.concatenate([np.zeros_like(cur[:1]), cur[:-1]], axis=0)
    left = np.concatenate([np.zeros_like(cur[:, :1]), cur[:, :-1]], axis=1)
    upleft = np.concatenate([np.zeros_like(up[:, :1]), up[:, :-1]], axis=1)
    p = left + up - upleft
    pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
    preds = np.stack([np.zeros_like(cur), left, up, (left + up) >> 1, paeth])  # indexed by filter type
    kinds = np.zeros(height, dtype=np.int64) if filters is None else np.asarray(filters, dtype=np.int64)
    filt = ((cur - preds[kinds, np.arange(height)]) & 0xFF).astype(np.uint8).reshape(height, width * bpp)
    raw = np.concatenate([kinds.astype(np.uint8)[:, None], filt], axis=1).tobytes()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 16, ctype, 0, 0, 0)
    return PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


# Cityscapes label ids drawn into the fixtures (road, building, sky, car, rider, bicycle, an ignored id).
_IDS = (7, 11, 23, 26, 25, 33, 0)


def _palette() -> list[int]:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, 768).tolist()  # colours unrelated to the ids: only the indices may be read


def make_label_ids(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Label ids: a road / building / sky layout plus a few small rectangles of rarer classes."""
    ids = np.full((h, w), 23, dtype=np.uint8)
    ids[h // 3:] = 11
    ids[2 * h // 3:] = 7
    for cls in rng.choice(_IDS[3:], size=3):
        rw, rh = int(rng.integers(2, w // 4)), int(rng.integers(2, h // 4))
        x, y = int(rng.integers(0, w - rw)), int(rng.integers(0, h - rh))
        ids[y:y + rh, x:x + rw] = cls
    return ids


def make_image(rng: np.random.Generator, ids: np.ndarray) -> np.ndarray:
    """A smooth image whose colours follow the label, plus noise (so crops of different windows differ)."""
    base = rng.integers(0, 256, (256, 3)).astype(np.float32)[ids]
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def make_gta5(root: str, n: int, size: tuple[int, int], seed: int = 0) -> str:
    """A GTA5-layout folder: RGB PNGs and palette ('P') label PNGs of Cityscapes label ids."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "labels"), exist_ok=True)
    for i in range(n):
        ids = make_label_ids(rng, *size)
        Image.fromarray(make_image(rng, ids)).save(os.path.join(root, "images", f"{i:05d}.png"))
        pal = Image.fromarray(ids, mode="P")
        pal.putpalette(_palette())
        pal.save(os.path.join(root, "labels", f"{i:05d}.png"))
    return root


def make_cityscapes(root: str, counts: dict[str, int], size: tuple[int, int], seed: int = 0) -> str:
    """A Cityscapes-layout folder with two cities per split and labelIds PNGs."""
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for i in range(n):
            city = f"city{i % 2}"
            name = f"{city}_{i:06d}_000019"
            for sub in ("leftImg8bit", "gtFine"):
                os.makedirs(os.path.join(root, sub, split, city), exist_ok=True)
            ids = make_label_ids(rng, *size)
            Image.fromarray(make_image(rng, ids)).save(
                os.path.join(root, "leftImg8bit", split, city, f"{name}_leftImg8bit.png"))
            label = os.path.join(root, "gtFine", split, city, f"{name}_gtFine_labelIds.png")
            Image.fromarray(ids, mode="L").save(label)
    return root


LT_SIZE, LT_CROP = (90, 54), (16, 12)  # small long-tail images and crops for the tests (defaults 1920x1080, 512)


def run_prepare(root: str, out: str, *extra: str, dataset: str = "gta5") -> int:
    small = ["--long-tail-size", *map(str, LT_SIZE), "--crop", *map(str, LT_CROP)] if dataset != "cityscapes" else []
    return prepare.main(["--dataset", dataset, "--root", root, "--out", out, "--workers", "0", "--no-progress",
                         *small, *extra])
