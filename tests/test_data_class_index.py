"""The cached class -> images index."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from dsp_fast.data import GTA5, DatasetError, load_or_build_class_index
from dsp_fast.data import class_index as class_index_module
from dsp_fast.data.class_index import default_cache_path

# Cityscapes label ids of each fixture image; train ids: 7 road -> 0, 26 car -> 13, 25 rider -> 12, 33 bicycle -> 18
LABELS = [[7, 26], [7], [7, 25, 33], [0, 26], [26, 33]]
EXPECTED = {0: [0, 1, 2], 12: [2], 13: [0, 3, 4], 18: [2, 4]}


def _write_label(path, ids):
    Image.fromarray(np.resize(np.asarray(ids, dtype=np.uint8), (4, 6))).save(path)


@pytest.fixture
def gta5(tmp_path):
    root = tmp_path / "gta5"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for k, ids in enumerate(LABELS):
        Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(root / "images" / f"{k:05d}.png")
        _write_label(root / "labels" / f"{k:05d}.png", ids)
    return GTA5(str(root))


def _expected(num_classes=19):
    return [EXPECTED.get(c, []) for c in range(num_classes)]


def test_builds_the_index_and_caches_it_beside_the_data(gta5):
    index = load_or_build_class_index(gta5, 19)
    assert index == _expected()
    path = default_cache_path(gta5, 19)
    assert path == os.path.join(gta5.root, ".dsp_class_index_gta5_19.json")
    with open(path) as f:
        assert json.load(f)["index"] == _expected()
    assert [n for n in os.listdir(gta5.root) if ".tmp." in n] == []  # the temp file was renamed away


def test_cache_is_reused_without_reading_labels(gta5, monkeypatch):
    first = load_or_build_class_index(gta5, 19)

    def fail(i):
        raise AssertionError("read_label called: the cache was not used")

    monkeypatch.setattr(gta5, "read_label", fail)
    assert load_or_build_class_index(gta5, 19) == first


def test_cache_is_rebuilt_when_a_label_changes(gta5):
    load_or_build_class_index(gta5, 19)
    path = gta5.label_paths[1]
    _write_label(path, [7, 28])  # image 1 now also holds a bus (train id 15)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # robust to coarse mtime clocks
    index = load_or_build_class_index(gta5, 19)
    assert index[15] == [1] and index[0] == [0, 1, 2]


def test_cache_is_rebuilt_when_files_are_added(gta5):
    load_or_build_class_index(gta5, 19)
    root = gta5.root
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(os.path.join(root, "images", "00009.png"))
    _write_label(os.path.join(root, "labels", "00009.png"), [31])
    index = load_or_build_class_index(GTA5(root), 19)
    assert index[16] == [5]


def test_corrupt_cache_is_rebuilt_and_custom_path(gta5, tmp_path):
    custom = str(tmp_path / "elsewhere.json")
    with open(custom, "w") as f:
        f.write("{ not json")
    assert load_or_build_class_index(gta5, 19, cache_path=custom) == _expected()
    with open(custom) as f:
        assert json.load(f)["num_images"] == len(LABELS)
    assert not os.path.exists(default_cache_path(gta5, 19))


def test_unwritable_cache_warns_but_returns_the_index(gta5, tmp_path):
    with pytest.warns(UserWarning, match="could not cache"):
        index = load_or_build_class_index(gta5, 19, cache_path=str(tmp_path / "no" / "such" / "dir.json"))
    assert index == _expected()


def test_parallel_build_matches_serial(gta5, monkeypatch, tmp_path):
    monkeypatch.setattr(class_index_module, "_PARALLEL_MIN_IMAGES", 1)

    def not_here(*args):
        raise AssertionError("labels read in the calling process: the worker pool was not used")

    monkeypatch.setattr(class_index_module, "_classes_in", not_here)  # spawned workers import the real one
    index = load_or_build_class_index(gta5, 19, cache_path=str(tmp_path / "p.json"), workers=2)
    assert index == _expected()


def test_ids_beyond_num_classes_are_refused(gta5, tmp_path):
    # A 19-class label indexed as if it were 16 classes: car (13) fits, bicycle (18) does not.
    with pytest.raises(DatasetError, match=r"0000[24]\.png"):
        load_or_build_class_index(gta5, 16, cache_path=str(tmp_path / "x.json"))
