"""A writer of 16-bit PNGs for the tests' SYNTHIA-style fixtures (PIL cannot write 16-bit colour PNGs), with any
row filter per row, so that `dsp_fast.data.pngio.decode_png16` is tested against every filter."""

import struct
import zlib

import numpy as np

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
