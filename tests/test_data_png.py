"""The 16-bit PNG fallback decoder and the label / image readers' handling of odd and broken files."""

import struct
import zlib

import numpy as np
import pytest
from helpers_data import encode_png16
from PIL import Image

from dsp_fast.data import DatasetError
from dsp_fast.data.pngio import decode_png16, read_label_ids, read_rgb


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("shape", [(17, 33, 3), (1, 1, 3), (5, 7, 2), (9, 4, 4), (6, 5, 1)])
@pytest.mark.parametrize("filters", ["none", "sub", "up", "avg", "paeth", "mixed"])
def test_decode_png16_matches_encoded_array_for_every_filter(tmp_path, shape, filters):
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 65536, size=shape, dtype=np.uint16)
    kinds = {"none": 0, "sub": 1, "up": 2, "avg": 3, "paeth": 4}
    rows = rng.integers(0, 5, shape[0]) if filters == "mixed" else np.full(shape[0], kinds[filters])
    path = _write(tmp_path / "x.png", encode_png16(arr, rows))
    np.testing.assert_array_equal(decode_png16(path), arr)


def test_gray16_encoding_agrees_with_pil(tmp_path):
    # PIL decodes 16-bit grayscale correctly, so it checks encode_png16 independently of decode_png16.
    arr = np.random.default_rng(2).integers(0, 65536, size=(11, 13), dtype=np.uint16)
    path = _write(tmp_path / "g.png", encode_png16(arr, np.arange(11) % 5))
    np.testing.assert_array_equal(np.asarray(Image.open(path)), arr)


def test_synthia_style_rgb16_label_reads_class_ids_where_pil_would_not(tmp_path):
    cls = np.array([[3, 4, 21], [1, 10, 0]], dtype=np.uint16)
    arr = np.stack([cls, cls * 100 + 7, np.zeros_like(cls)], axis=-1)  # class, instance, unused
    path = _write(tmp_path / "l.png", encode_png16(arr, [4, 1]))
    assert np.asarray(Image.open(path))[..., 0].max() == 0  # PIL keeps the high byte: every class becomes 0
    np.testing.assert_array_equal(read_label_ids(path, allow_multichannel=True), cls)
    with pytest.raises(DatasetError, match="multi-channel"):
        read_label_ids(path)


def test_rgb8_label_rejected_unless_multichannel_allowed(tmp_path):
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 7
    path = str(tmp_path / "c.png")
    Image.fromarray(rgb).save(path)
    with pytest.raises(DatasetError, match=r"c\.png.*mode 'RGB'"):
        read_label_ids(path)
    np.testing.assert_array_equal(read_label_ids(path, allow_multichannel=True), rgb[..., 0])


def test_png16_corruption_is_detected(tmp_path):
    good = encode_png16(np.arange(60, dtype=np.uint16).reshape(4, 5, 3), [4, 3, 2, 1])
    flipped = bytearray(good)
    flipped[45] ^= 0xFF  # inside IDAT: the chunk CRC no longer matches
    with pytest.raises(DatasetError, match=r"bad\.png.*CRC"):
        decode_png16(_write(tmp_path / "bad.png", bytes(flipped)))
    with pytest.raises(DatasetError, match=r"short\.png.*truncated"):
        decode_png16(_write(tmp_path / "short.png", good[: len(good) - 20]))
    with pytest.raises(DatasetError, match=r"short\.png.*truncated"):
        read_label_ids(str(tmp_path / "short.png"), allow_multichannel=True)


def test_interlaced_png16_is_refused_not_misread(tmp_path):
    data = bytearray(encode_png16(np.zeros((2, 2, 3), np.uint16)))
    data[28] = 1  # IHDR interlace byte; fix the CRC so only the interlace flag is "wrong"
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    with pytest.raises(DatasetError, match="interlaced"):
        decode_png16(_write(tmp_path / "i.png", bytes(data)))


@pytest.mark.parametrize("reader", [read_rgb, read_label_ids])
def test_truncated_or_garbage_8bit_files_name_the_path(tmp_path, reader):
    path = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    for name, blob in (("half.png", data[: len(data) // 2]), ("head.png", data[:20]), ("junk.png", b"junk" * 20)):
        with pytest.raises(DatasetError, match=name.replace(".", r"\.")):
            reader(_write(tmp_path / name, blob))
    with pytest.raises(DatasetError, match=r"missing\.png"):
        reader(str(tmp_path / "missing.png"))
