"""The built-in synthetic domain-shift dataset: generated fast, deterministic, readable by the real readers."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dsp_fast.data import GTA5, Cityscapes, DatasetError, ensure_synthetic, load_or_build_class_index, synthetic
from dsp_fast.data.synthetic import MARKER, SyntheticSpec, make_sample

SMALL = SyntheticSpec(source_count=6, target_train_count=4, target_val_count=2)
RARE_TRAIN_IDS = {"rider": 12, "bus": 15, "train": 16, "motorcycle": 17, "bicycle": 18}
SCENE_TRAIN_IDS = {0, 1, 2, 8, 10, 11, 12, 13, 15, 16, 17, 18, 255}


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The default dataset, generated once for the module; (gta5_root, cityscapes_root)."""
    root = tmp_path_factory.mktemp("synthetic") / "data"
    return ensure_synthetic(str(root), seed=0)


def _files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(dirpath, n), "rb") as f:
                out[os.path.relpath(os.path.join(dirpath, n), root)] = f.read()
    return out


def test_generated_and_readable_by_the_real_readers(full):
    gta5_root, cs_root = full
    gta5 = GTA5(gta5_root)
    train, val = Cityscapes(cs_root, "train"), Cityscapes(cs_root, "val")
    assert (len(gta5), len(train), len(val)) == (300, 150, 60)
    for ds, shape in ((gta5, (144, 256)), (train, (128, 256)), (val, (128, 256))):
        for i in (0, len(ds) - 1):
            image, label = ds[i]
            assert image.shape == (*shape, 3) and label.shape == shape
            assert set(np.unique(label)) <= SCENE_TRAIN_IDS
            assert {0, 2, 10} <= set(np.unique(label))  # road, building, sky in every scene


def test_rare_classes_are_in_a_minority_of_source_images(full):
    gta5 = GTA5(full[0])
    index = load_or_build_class_index(gta5, 19)
    for name, train_id in RARE_TRAIN_IDS.items():
        share = len(index[train_id]) / len(gta5)
        assert 0.02 <= share <= 0.2, f"{name} in {share:.0%} of the source images"
    assert len(index[0]) == len(gta5) and len(index[13]) > 0.9 * len(gta5)  # road everywhere, cars nearly


def test_target_is_restyled_but_keeps_relative_brightness():
    spec = SyntheticSpec()
    stats = {}
    for domain in ("source", "target_val"):
        luma, sat = {}, {}
        for i in range(12):
            image, label = make_sample(spec, domain, i)
            y = image.astype(np.float64) @ [0.299, 0.587, 0.114]
            s = image.max(axis=2).astype(np.float64) - image.min(axis=2)
            for cls in (7, 23):  # road, sky
                luma.setdefault(cls, []).append(y[label == cls].mean())
                sat.setdefault(cls, []).append(s[label == cls].mean())
        stats[domain] = ({c: np.mean(v) for c, v in luma.items()}, {c: np.mean(v) for c, v in sat.items()})
    (src_luma, src_sat), (tgt_luma, tgt_sat) = stats["source"], stats["target_val"]
    assert src_luma[23] > src_luma[7] + 30 and tgt_luma[23] > tgt_luma[7] + 15  # sky brighter than road in both
    assert tgt_sat[23] < 0.7 * src_sat[23]  # the target is clearly desaturated
    assert tgt_luma[7] < src_luma[7]  # and darker


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = ensure_synthetic(str(tmp_path / "a"), seed=3, spec=SMALL, workers=1)
    b = ensure_synthetic(str(tmp_path / "b"), seed=3, spec=SMALL, workers=1)
    c = ensure_synthetic(str(tmp_path / "c"), seed=4, spec=SMALL, workers=1)
    files_a, files_b, files_c = (_files(os.path.dirname(r[0])) for r in (a, b, c))
    assert len(files_a) == 1 + 2 * (6 + 4 + 2)  # marker + image and label per sample
    assert files_a == files_b
    assert files_a.keys() == files_c.keys()
    assert files_a["gta5/images/00001.png"] != files_c["gta5/images/00001.png"]
    image_a, label_a = make_sample(dataclasses.replace(SMALL, seed=3), "target_train", 1)
    image_b, label_b = make_sample(dataclasses.replace(SMALL, seed=3), "target_train", 1)
    np.testing.assert_array_equal(image_a, image_b)
    np.testing.assert_array_equal(label_a, label_b)


def test_files_written_by_worker_processes_equal_the_pure_function(full):
    # the module fixture generated with worker processes (2 or more CPUs) or in-process; either way the files must
    # hold exactly make_sample's arrays
    gta5, val = GTA5(full[0]), Cityscapes(full[1], "val")
    spec = SyntheticSpec()
    for ds, domain, i in ((gta5, "source", 0), (gta5, "source", 299), (val, "target_val", 59)):
        image, label_ids = make_sample(spec, domain, i)
        np.testing.assert_array_equal(ds.read_image(i), image)
        raw = np.asarray(Image.open(ds.label_paths[i]))
        np.testing.assert_array_equal(raw, label_ids)


def test_complete_dataset_is_reused(tmp_path, monkeypatch):
    root = str(tmp_path / "d")
    ensure_synthetic(root, spec=SMALL, workers=1)

    def fail(*args):
        raise AssertionError("regenerated a complete dataset")

    monkeypatch.setattr(synthetic, "_generate_into", fail)
    assert ensure_synthetic(root, spec=SMALL) == (os.path.join(root, "gta5"), os.path.join(root, "cityscapes"))


def test_generating_the_synthetic_set_says_where(tmp_path, capsys):
    """Every command goes through ensure_synthetic, and a checkpoint's relative data.synthetic_root generates tens
    of MB in the current folder: it says where, once, and nothing when the set is already there."""
    spec = SyntheticSpec(source_count=2, target_train_count=1, target_val_count=1)
    root = tmp_path / "syn"
    ensure_synthetic(str(root), spec=spec, workers=1)
    assert f"generating the built-in synthetic domain-shift dataset into {root}" in capsys.readouterr().out
    ensure_synthetic(str(root), spec=spec, workers=1)
    assert "generating" not in capsys.readouterr().out


def test_interrupted_generation_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    root = tmp_path / "d"
    calls = []

    def crash(spec, jobs):
        calls.append(len(jobs))
        synthetic.make_sample(spec, *jobs[0][:2])
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-way

    monkeypatch.setattr(synthetic, "_write_samples", crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(str(root), spec=SMALL, workers=1)
    assert calls and not root.exists() and os.listdir(tmp_path) == []  # temp folder cleaned up
    monkeypatch.undo()
    ensure_synthetic(str(root), spec=SMALL, workers=1)
    assert (root / MARKER).exists() and len(GTA5(str(root / "gta5"))) == 6


def test_new_seed_replaces_our_dataset_but_never_a_foreign_folder(tmp_path):
    root = tmp_path / "d"
    ensure_synthetic(str(root), seed=0, spec=SMALL, workers=1)
    before = (root / "gta5" / "images" / "00001.png").read_bytes()
    ensure_synthetic(str(root), seed=1, spec=SMALL, workers=1)
    assert (root / "gta5" / "images" / "00001.png").read_bytes() != before
    assert sorted(os.listdir(tmp_path)) == ["d"]  # the old copy and the temp folder are gone
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="mine: exists and is not a synthetic dataset"):
        ensure_synthetic(str(foreign), spec=SMALL, workers=1)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_command_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(synthetic, "SyntheticSpec", lambda seed=0: dataclasses.replace(SMALL, seed=seed))
    synthetic.main(["--out", str(tmp_path / "cli"), "--seed", "2"])
    assert "synthetic dataset ready" in capsys.readouterr().out
    assert len(Cityscapes(str(tmp_path / "cli" / "cityscapes"), "val")) == 2


def test_module_runs_as_a_script_without_import_warnings():
    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "dsp_fast.data.synthetic", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--seed" in done.stdout, done.stderr
