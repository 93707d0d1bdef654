"""dsp_fast.prepare: palette labels keep their ids, the manifest describes the data, resume, rejects."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers_data import LT_CROP, LT_SIZE, make_cityscapes, make_gta5, run_prepare
from PIL import Image

from dsp_fast import prepare
from dsp_fast.data import GTA5, resize_image, resize_label
from dsp_fast.data.labels import CITYSCAPES_ID_TO_TRAIN_ID
from dsp_fast.pipelines import prepared


@pytest.fixture(scope="module")
def gta5_root(tmp_path_factory) -> str:
    return make_gta5(str(tmp_path_factory.mktemp("gta5")), 6, (60, 36))


def test_palette_labels_keep_their_ids_and_manifest_counts_them(gta5_root, tmp_path):
    out = str(tmp_path / "out")
    assert run_prepare(gta5_root, out, "--size", "40", "24", "--format", "png", "--workers", "2") == 0
    m = json.load(open(os.path.join(out, prepared.MANIFEST)))
    ds = GTA5(gta5_root)
    assert m["stems"] == [f"{i:05d}" for i in range(6)] and m["size"] == [40, 24] and m["source_sizes"][0] == [60, 36]
    index = np.load(os.path.join(out, prepared.INDEX))
    for i, stem in enumerate(m["stems"]):
        with Image.open(os.path.join(gta5_root, "labels", stem + ".png")) as im:
            raw = np.asarray(im)  # palette indices = label ids
        expected = resize_label(CITYSCAPES_ID_TO_TRAIN_ID[raw], (40, 24))
        with Image.open(prepared.label_path(out, stem)) as im:
            assert im.mode == "L"
            got = np.asarray(im)
        np.testing.assert_array_equal(got, expected)
        with Image.open(prepared.image_path(out, stem, "png")) as im:  # lossless: exactly the reference's resize
            # GTA5 images: bicubic, as the authors' loader
            np.testing.assert_array_equal(np.asarray(im), resize_image(ds.read_image(i), (40, 24), "bicubic"))
        counts = np.bincount(got.ravel(), minlength=256)[:19]
        np.testing.assert_array_equal(index["counts"][i], counts)
        for c in np.flatnonzero(counts):
            assert i in m["class_images"][c]
    assert {12, 18} & {c for c in range(19) if m["class_images"][c]}  # rider / bicycle drawn: long-tail material
    assert set(np.unique(np.concatenate([np.asarray(Image.open(prepared.label_path(out, s))).ravel()
                                         for s in m["stems"]]))) <= set(range(19)) | {255}


def brute_force_windows(label: np.ndarray, cls: int, crop: tuple[int, int]) -> int:
    cw, ch = crop
    h, w = label.shape
    return sum(bool((label[y:y + ch, x:x + cw] == cls).any()) for y in range(h - ch + 1) for x in range(w - cw + 1))


def test_long_tail_subset_at_its_size_with_window_counts(gta5_root, tmp_path):
    out = str(tmp_path / "out")
    assert run_prepare(gta5_root, out, "--size", "40", "24", "--format", "png") == 0
    m = json.load(open(os.path.join(out, prepared.MANIFEST)))
    assert m["long_tail"] == prepared.LONG_TAIL_DIR
    lt_dir = os.path.join(out, prepared.LONG_TAIL_DIR)
    lt = prepared.load_prepared(lt_dir)
    assert lt.size == LT_SIZE and lt.crop == LT_CROP and prepared.load_prepared(out).long_tail == lt_dir
    ds = GTA5(gta5_root)
    holders = []
    for i, stem in enumerate(m["stems"]):
        want = resize_label(ds.read_label(i), LT_SIZE)  # the original label, nearest to the long-tail size
        present = [c for c in (12, 15, 16, 17, 18) if (want == c).any()]
        if not present:
            assert stem not in lt.stems
            continue
        holders.append(stem)
        j = lt.stems.index(stem)
        np.testing.assert_array_equal(prepared.read_label_array(lt, j), want)
        with Image.open(lt.image_path(j)) as im:
            np.testing.assert_array_equal(np.asarray(im), resize_image(ds.read_image(i), LT_SIZE, "bicubic"))
        for c in range(19):  # counted for the long-tail classes only, by brute force here
            n = brute_force_windows(want, c, LT_CROP) if c in (12, 15, 16, 17, 18) else 0
            assert lt.window_counts[j, c] == n, (stem, c)
            if n:  # and mapped: the stored map holds exactly those windows
                assert prepared.read_window_map(lt, j, c)[0].sum() == n, (stem, c)
    assert lt.stems == holders and holders  # the fixture draws riders and bicycles


def test_resume_after_interruption_redoes_nothing_finished(gta5_root, tmp_path, monkeypatch):
    fresh, resumed = str(tmp_path / "fresh"), str(tmp_path / "resumed")
    assert run_prepare(gta5_root, fresh, "--size", "40", "24") == 0
    real, calls = prepare.convert_one, []

    def interrupted(i):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(i)
        return real(i)

    monkeypatch.setattr(prepare, "convert_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(gta5_root, resumed, "--size", "40", "24")
    assert not os.path.exists(os.path.join(resumed, prepared.MANIFEST))
    # An interruption between the image and its sidecar: a temp file and an image with no sidecar are left.
    open(os.path.join(resumed, "images", "00004.jpg.tmp.1"), "wb").write(b"half")
    open(prepared.image_path(resumed, "00003", "jpeg"), "wb").write(b"half")
    monkeypatch.setattr(prepare, "convert_one", real)
    ds = GTA5(gta5_root)
    opts = prepare.Options("gta5", None, os.path.abspath(gta5_root), (40, 24), "jpeg", 95, 19, True, "bicubic",
                           (12, 15, 16, 17, 18), LT_SIZE, LT_CROP)
    summary = prepare.prepare_set(ds, resumed, opts, progress=False)
    assert (summary.converted, summary.skipped, summary.rejects) == (3, 3, [])
    assert not os.path.exists(os.path.join(resumed, "images", "00004.jpg.tmp.1"))
    for name in (prepared.MANIFEST, "images/00003.jpg", "labels/00005.png"):
        assert open(os.path.join(resumed, name), "rb").read() == open(os.path.join(fresh, name), "rb").read(), name
    a, b = np.load(os.path.join(fresh, prepared.INDEX)), np.load(os.path.join(resumed, prepared.INDEX))
    np.testing.assert_array_equal(a["counts"], b["counts"])
    lt = [np.load(os.path.join(d, prepared.LONG_TAIL_DIR, prepared.INDEX))["window_counts"] for d in (fresh, resumed)]
    np.testing.assert_array_equal(*lt)
    assert "6 images ready (3 converted now, 3 already done)" in summary.report()


def test_corrupt_input_is_reported_by_path_and_skipped(gta5_root, tmp_path, capsys):
    root = make_gta5(str(tmp_path / "gta5"), 3, (40, 24))
    bad = os.path.join(root, "images", "00001.png")
    data = open(bad, "rb").read()
    open(bad, "wb").write(data[: len(data) // 2])  # truncated PNG
    out = str(tmp_path / "out")
    assert run_prepare(root, out, "--size", "40", "24") == 1
    captured = capsys.readouterr()
    assert f"REJECTED {bad}" in captured.out and "rejected" in captured.err
    m = json.load(open(os.path.join(out, prepared.MANIFEST)))
    assert m["stems"] == ["00000", "00002"] and [r["path"] for r in m["rejects"]] == [bad]
    assert open(os.path.join(out, prepared.REJECTS)).read().startswith(bad + "\t")
    # Fixed input: the rerun converts only the rejected image and reports a clean run.
    make_gta5(root, 3, (40, 24))
    assert run_prepare(root, out, "--size", "40", "24") == 0
    assert "3 images ready (1 converted now, 2 already done), 0 rejected" in capsys.readouterr().out


def test_rerun_with_other_options_is_refused(gta5_root, tmp_path):
    out = str(tmp_path / "out")
    assert run_prepare(gta5_root, out, "--size", "40", "24") == 0
    with pytest.raises(SystemExit, match="quality: 95 -> 80"):
        run_prepare(gta5_root, out, "--size", "40", "24", "--quality", "80")


def test_cityscapes_splits_keep_labels_and_jpeg_decodes_to_the_same_size(tmp_path):
    root = make_cityscapes(str(tmp_path / "cs"), {"train": 3, "val": 2}, (48, 24))
    out = str(tmp_path / "out")
    assert run_prepare(root, out, "--size", "32", "16", dataset="cityscapes") == 0
    for split, n in (("train", 3), ("val", 2)):
        m = json.load(open(os.path.join(out, split, prepared.MANIFEST)))
        assert m["split"] == split and len(m["stems"]) == n and m["labels"] and m["format"] == "jpeg"
        assert m["stems"][0] == "city0_000000_000019"
        with Image.open(prepared.image_path(os.path.join(out, split), m["stems"][0], "jpeg")) as im:
            assert im.size == (32, 16) and im.format == "JPEG" and not im.info.get("progressive")
    assert run_prepare(root, str(tmp_path / "o2"), "--split", "val", "--no-labels", dataset="cityscapes") == 0
    assert not json.load(open(tmp_path / "o2" / "val" / prepared.MANIFEST))["labels"]


def test_encoded_size_reads_png_and_jpeg_headers_and_names_bad_files(tmp_path):
    img = np.zeros((7, 13, 3), np.uint8)
    jpg = prepare.encode_image(img, "jpeg", 90)
    assert prepared.encoded_size(jpg, "a.jpg") == (13, 7)
    assert prepared.encoded_size(prepare.encode_image(img, "png", 0), "a.png") == (13, 7)
    with pytest.raises(ValueError, match="b.jpg: corrupt JPEG"):
        prepared.encoded_size(jpg[:4] + b"\x00" * 40, "b.jpg")
    with pytest.raises(ValueError, match="c.png: not a PNG or JPEG"):
        prepared.encoded_size(b"hello", "c.png")
    with pytest.raises(ValueError, match="d.png: not an 8-bit grayscale"):
        prepared.check_gray8(prepare.encode_image(img, "png", 0), "d.png")


def test_gta5_pairs_of_different_sizes_are_resized_and_counted(tmp_path, capsys):
    root = make_gta5(str(tmp_path / "gta5"), 2, (60, 36))
    label = os.path.join(root, "labels", "00000.png")
    with Image.open(label) as im:
        im.resize((im.width * 2, im.height * 2), Image.Resampling.NEAREST).save(label)  # keeps the palette
    out = tmp_path / "prepared"
    assert run_prepare(root, str(out), "--size", "64", "36") == 0
    assert "1 image/label pairs of different sizes, both resized" in capsys.readouterr().out
    assert Image.open(out / "labels" / "00000.png").size == (64, 36)


def test_label_ids_outside_the_table_are_counted_and_named_in_one_line(tmp_path, capsys):
    """Ids no GTA5 / Cityscapes label holds (not 0..33 nor 255) train as ignore, as before, but are said; ids of the
    table that map to ignore (0 'unlabeled', 5 'dynamic') stay silent."""
    root = make_gta5(str(tmp_path / "gta5"), 4, (30, 18))
    for stem, ids in (("00001", (200, 40)), ("00003", (99, 0, 5))):
        path = os.path.join(root, "labels", f"{stem}.png")
        with Image.open(path) as im:
            raw, palette = np.asarray(im).copy(), im.getpalette()
        for k, i in enumerate(ids):
            raw[k, :3] = i  # 3 pixels of each
        pal = Image.fromarray(raw, mode="P")
        pal.putpalette(palette)
        pal.save(path)
    assert run_prepare(root, str(tmp_path / "out"), "--size", "30", "18") == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if "warning:" in line]
    assert len(warnings) == 1, out  # the long-tail pass reads these labels again: not said twice
    assert "2 label files hold ids outside the dataset's label table, trained as ignore (255): ids 40 (3 px), " \
           "99 (3 px), 200 (3 px); e.g. " + os.path.join(root, "labels", "00001.png") in warnings[0], warnings[0]
    with Image.open(prepared.label_path(str(tmp_path / "out"), "00001")) as im:
        assert (np.asarray(im)[:2, :3] == 255).all()  # ignored, as the table says
    clean = make_cityscapes(str(tmp_path / "cs"), {"train": 2}, (30, 18))
    assert run_prepare(clean, str(tmp_path / "cs_out"), "--split", "train", "--size", "30", "18",
                       dataset="cityscapes") == 0
    assert "warning:" not in capsys.readouterr().out
