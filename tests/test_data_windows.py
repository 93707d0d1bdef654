"""Valid long-tail windows (dsp_fast.data.windows) against a brute-force scan of every window."""

import numpy as np
import pytest

from dsp_fast.data.windows import count_valid_windows, draw_valid_window, valid_windows


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
    assert count_valid_windows(label, (4, 6), crop) == {4: int(want.sum())}  # class 6 absent: left out
    assert not valid_windows(label, 6, crop).any()
    draws = {draw_valid_window(rng, label, 4, crop) for _ in range(200)}
    assert all(want[y, x] for y, x in draws)


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
