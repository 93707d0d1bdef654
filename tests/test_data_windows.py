"""Valid long-tail windows (dsp_fast.data.windows) against a brute-force scan of every window; the window map
preparation stores (bit-packed, read back by the loader) draws the same windows as the label it came from."""

import numpy as np
import pytest

from dsp_fast.data.windows import draw_in_box, draw_valid_window, valid_window_box, valid_windows
from dsp_fast.pipelines import prepared


def brute(label: np.ndarray, cls: int, crop: tuple[int, int]) -> np.ndarray:
    cw, ch = crop
    h, w = label.shape
    return np.array([[(label[y:y + ch, x:x + cw] == cls).any() for x in range(w - cw + 1)]
                     for y in range(h - ch + 1)], dtype=bool)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("crop", [(1, 1), (3, 2), (5, 7), (11, 9)])
def test_valid_windows_equal_a_brute_force_scan(seed, crop):
    rng = np.random.default_rng(seed)
    label = np.zeros((9, 11), dtype=np.uint8)
    for _ in range(seed % 3 + 1):  # a few pixels or small blobs of class 4, anywhere (edges included)
        y, x = int(rng.integers(9)), int(rng.integers(11))
        label[y:y + int(rng.integers(1, 3)), x:x + int(rng.integers(1, 3))] = 4
    want = brute(label, 4, crop)
    np.testing.assert_array_equal(valid_windows(label, 4, crop), want)
    box, y_lo, x_lo = valid_window_box(label, 4, crop)
    assert box.sum() == want.sum() and want[y_lo:y_lo + box.shape[0], x_lo:x_lo + box.shape[1]][box].all()
    assert not valid_windows(label, 6, crop).any() and not valid_window_box(label, 6, crop)[0].any()
    draws = {draw_valid_window(rng, label, 4, crop) for _ in range(200)}
    assert all(want[y, x] for y, x in draws)


@pytest.mark.parametrize("seed", range(4))
def test_the_stored_window_map_draws_what_the_label_draws(seed, tmp_path):
    rng = np.random.default_rng(seed)
    label = np.zeros((37, 53), dtype=np.uint8)
    for cls in (4, 7):
        for _ in range(3):
            y, x = int(rng.integers(37)), int(rng.integers(53))
            label[y:y + int(rng.integers(1, 6)), x:x + int(rng.integers(1, 6))] = cls
    crop = (13, 9)
    stored = tmp_path / "windows" / "img.npz"
    stored.parent.mkdir()
    stored.write_bytes(prepared.encode_window_maps({c: valid_window_box(label, c, crop) for c in (4, 7)}))
    ds = prepared.PreparedSet(root=str(tmp_path), size=(53, 37), format="png", num_classes=19, stems=["img"],
                              has_labels=True, crop=crop, window_counts=None, long_tail_classes=[4, 7], long_tail=None)
    for cls in (4, 7):
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        from_label = [draw_valid_window(a, label, cls, crop) for _ in range(50)]
        from_map = [draw_in_box(b, *prepared.read_window_map(ds, 0, cls)) for _ in range(50)]
        assert from_map == from_label
    with pytest.raises(prepared.DatasetError, match="no window map of class 5"):
        prepared.read_window_map(ds, 0, 5)


def test_draw_is_uniform_over_the_valid_windows():
    label = np.zeros((6, 8), dtype=np.uint8)
    label[2, 3] = 1  # 3x3 crops: the 9 windows around the pixel
    rng = np.random.default_rng(0)
    counts: dict = {}
    for _ in range(1800):
        key = draw_valid_window(rng, label, 1, (3, 3))
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) == {(y, x) for y in range(3) for x in range(1, 4)}
    assert max(counts.values()) < 200 + 60 and min(counts.values()) > 200 - 60  # 200 expected, sd 13
    with pytest.raises(ValueError, match="no 3x3 window holds class 2"):
        draw_valid_window(rng, label, 2, (3, 3))
