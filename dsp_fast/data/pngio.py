"""Reading image and label PNGs, with every decoder failure re-raised as a DatasetError that names the file.

Label PNGs come in these forms, all returned as a 2-D integer array of raw ids:
- 8-bit 'L' grayscale, or 'P' palette (Cityscapes labelIds, GTA5): the stored index is the id, the palette is
  ignored (np.array of a 'P' image gives the indices);
- 16-bit grayscale ('I;16'): through PIL, as uint16;
- 16-bit RGB / RGBA / gray+alpha (SYNTHIA GT/LABELS: class id in the first channel, instance id in the second):
  PIL keeps only the high byte of each sample (every class id below 256 becomes 0), so `decode_png16` decodes them
  here (non-interlaced only). Multi-channel 8-bit labels only where the caller allows it (SYNTHIA): elsewhere an
  RGB label is most likely a colour visualisation.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
from PIL import Image

from dsp_fast.data.errors import DatasetError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour type -> samples per pixel (0 gray, 2 RGB, 4 gray+alpha, 6 RGBA; 3 palette is never 16-bit).
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}
# Everything PIL (and zlib / struct below) raises on a corrupt or truncated file.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, struct.error, Image.DecompressionBombError)


def _png_header(path: str) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR, or None when the file is not a PNG (PIL decides then)."""
    try:
        with open(path, "rb") as f:
            head = f.read(33)
    except OSError as e:
        raise DatasetError(f"{path}: cannot open ({e})") from None
    if len(head) < 33 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def _unfilter_wavefront(filt: np.ndarray, kinds: np.ndarray) -> np.ndarray:
    """Undo the PNG row filters of a whole image, any mix of filter types (needed once Average/Paeth appear).

    filt_HWB: filtered bytes (H rows, W pixels, B bytes per pixel); kinds_H: each row's filter type.
    A byte depends on its left (a), upper (b) and upper-left (c) neighbours, so all pixels of one anti-diagonal
    are independent: H+W-1 vectorised steps instead of H*W scalar ones. The image is stored skewed,
    skew[d + 1, i + 1] = pixel (i, d - i), so each diagonal and both diagonals before it are plain slices;
    the zero border of the skewed buffer stands for the pixels outside the image, which PNG defines as 0."""
    height, width, bpp = filt.shape
    ii, jj = np.indices((height, width))
    skew_in = np.zeros((height + width, height + 1, bpp), dtype=np.int16)
    skew_in[ii + jj + 1, ii + 1] = filt
    skew = np.zeros_like(skew_in)
    kinds_col = kinds.astype(np.int16)[:, None]
    for d in range(height + width - 1):
        lo, hi = max(0, d - width + 1), min(height - 1, d) + 1  # rows i on this diagonal
        a = skew[d, lo + 1:hi + 1]  # (i, j-1): previous diagonal, same row
        b = skew[d, lo:hi]  # (i-1, j): previous diagonal, row above
        c = skew[d - 1, lo:hi] if d > 0 else np.zeros_like(b)  # (i-1, j-1): two diagonals back
        p = a + b - c
        pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
        k = kinds_col[lo:hi]
        pred = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))  # Paeth (4)
        pred = np.where(k == 3, (a + b) >> 1, pred)
        pred = np.where(k == 2, b, pred)
        pred = np.where(k == 1, a, pred)
        pred = np.where(k == 0, 0, pred)
        skew[d + 1, lo + 1:hi + 1] = (skew_in[d + 1, lo + 1:hi + 1] + pred) & 0xFF
    return skew[ii + jj + 1, ii + 1].astype(np.uint8)


def decode_png16(path: str) -> np.ndarray:
    """Decode a non-interlaced 16-bit PNG of any colour type to uint16 HxWxC (C = 1, 2, 3 or 4)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DatasetError(f"{path}: cannot open ({e})") from None
    if data[:8] != PNG_SIGNATURE:
        raise DatasetError(f"{path}: not a PNG file")
    pos, idat, header, ended = 8, [], None, False
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body, crc = data[pos + 8:pos + 8 + length], data[pos + 8 + length:pos + 12 + length]
        if len(body) < length or len(crc) < 4:
            break
        if zlib.crc32(kind + body) & 0xFFFFFFFF != struct.unpack(">I", crc)[0]:
            raise DatasetError(f"{path}: corrupt PNG (bad CRC in chunk {kind!r})")
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            ended = True
            break
        pos += 12 + length
    if header is None or not ended:
        raise DatasetError(f"{path}: truncated PNG (no {'IHDR' if header is None else 'IEND'} chunk)")
    width, height, depth, ctype, _, _, interlace = header
    if depth != 16 or ctype not in _CHANNELS:
        raise DatasetError(f"{path}: expected a 16-bit PNG, got bit depth {depth}, colour type {ctype}")
    if interlace:
        raise DatasetError(f"{path}: interlaced 16-bit PNGs are not supported; re-save it without interlacing")
    channels = _CHANNELS[ctype]
    bpp, stride = 2 * channels, 2 * channels * width
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as e:
        raise DatasetError(f"{path}: corrupt PNG image data ({e})") from None
    if len(raw) != height * (stride + 1):
        raise DatasetError(f"{path}: truncated PNG image data ({len(raw)} bytes, expected {height * (stride + 1)})")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, stride + 1)
    kinds, filt = rows[:, 0], rows[:, 1:].reshape(height, width, bpp)
    if kinds.max(initial=0) > 4:
        raise DatasetError(f"{path}: corrupt PNG (unknown row filter {int(kinds.max())})")
    if kinds.max(initial=0) >= 3:
        out = _unfilter_wavefront(filt, kinds)
    else:  # None / Sub / Up only: each row is one vectorised step
        out = np.empty((height, width, bpp), dtype=np.uint8)
        prev = np.zeros((width, bpp), dtype=np.uint8)
        for r in range(height):
            if kinds[r] == 0:
                out[r] = filt[r]
            elif kinds[r] == 1:  # Sub: running sum along the row per byte lane; uint8 cumsum wraps like PNG
                out[r] = np.cumsum(filt[r], axis=0, dtype=np.uint8)
            else:  # Up
                out[r] = filt[r] + prev
            prev = out[r]
    return out.view(">u2").reshape(height, width, channels).astype(np.uint16)


def read_rgb(path: str) -> np.ndarray:
    """An image file as uint8 HxWx3 RGB: palette, gray and RGBA images converted (alpha dropped), 16-bit samples
    reduced to their high byte (PIL does so for 16-bit colour; its 16-bit gray would saturate at 255)."""
    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L"):
                gray = (np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8)
                return np.repeat(gray[:, :, None], 3, axis=2)
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found") from None
    except Image.UnidentifiedImageError:
        raise DatasetError(f"{path}: not an image file (no known image format)") from None
    except _DECODE_ERRORS as e:
        raise DatasetError(f"{path}: corrupt or truncated image ({e})") from None


def read_label_ids(path: str, allow_multichannel: bool = False) -> np.ndarray:
    """A label PNG as a 2-D integer array of the raw ids it stores (the forms: the module docstring).
    allow_multichannel: take the first channel of an RGB(A) label (SYNTHIA); otherwise such a label raises."""
    header = _png_header(path)
    if header is not None and header[0] == 16 and header[1] in (2, 4, 6):
        if not allow_multichannel:
            raise DatasetError(f"{path}: a multi-channel label image; expected a single-channel (L, P) label PNG")
        return decode_png16(path)[:, :, 0]
    try:
        with Image.open(path) as im:
            mode = im.mode
            arr = np.asarray(im)
    except FileNotFoundError:
        raise DatasetError(f"{path}: label file not found") from None
    except _DECODE_ERRORS as e:
        raise DatasetError(f"{path}: corrupt or truncated label image ({e})") from None
    if mode in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
        return arr
    if mode in ("RGB", "RGBA", "LA") and allow_multichannel:
        return arr[:, :, 0]
    raise DatasetError(f"{path}: label image mode {mode!r} is not a single-channel id image (expected L, P or I;16)")
