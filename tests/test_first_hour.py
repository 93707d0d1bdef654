"""A researcher's first hour: the trainers run from any folder, take flags and overrides in any order, prepare the
configured roots at the configured sizes once, check every root at start-up, name every bad file (exit code 2,
nothing written lost), and put each run in its own folder with its final figures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dsp_fast import evaluate, prepare, reference, train
from dsp_fast.config import apply_cli_args, load_config
from dsp_fast.data import DatasetError
from dsp_fast.engine.data_setup import resolve_data
from dsp_fast.engine.monitor import CAPTION_H, GRID_COLUMNS, PALETTE, labelled_grid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["data.crop_size=[32,32]", "data.eval_size=[64,32]", "data.max_eval_images=2", "train.log_every=1",
        "train.compare_source_only=false", "train.max_steps=2"]


def small_layout(synthetic_root: str, dst, n_source: int = 4, n_target: int = 2) -> tuple[str, str]:
    """A few files of the generated shift copied into fresh GTA5 / Cityscapes-layout folders (train and val)."""
    gta, cs = str(dst / "gta5"), str(dst / "cityscapes")
    for sub in ("images", "labels"):
        os.makedirs(os.path.join(gta, sub))
        for name in sorted(os.listdir(os.path.join(synthetic_root, "gta5", sub)))[:n_source]:
            shutil.copy(os.path.join(synthetic_root, "gta5", sub, name), os.path.join(gta, sub, name))
    for split in ("train", "val"):
        src = os.path.join(synthetic_root, "cityscapes", "leftImg8bit", split)
        city = sorted(os.listdir(src))[0]
        for name in sorted(os.listdir(os.path.join(src, city)))[:n_target]:
            stem = name.removesuffix("_leftImg8bit.png")
            for top, suffix in (("leftImg8bit", "_leftImg8bit.png"), ("gtFine", "_gtFine_labelIds.png")):
                os.makedirs(os.path.join(cs, top, split, city), exist_ok=True)
                shutil.copy(os.path.join(synthetic_root, "cityscapes", top, split, city, stem + suffix),
                            os.path.join(cs, top, split, city, stem + suffix))
    return gta, cs


def real_args(gta: str, cs: str, tmp_path, *extra: str) -> list[str]:
    """The paper preset pointed at small GTA5 / Cityscapes-layout folders, tiny model and sizes."""
    return ["--config", "gta2cs", f"data.source_root={gta}", f"data.target_root={cs}", "model.arch=tiny",
            "data.source_size=[64,36]", "data.target_size=[64,32]", "data.num_workers=0", "train.eval_every=0",
            "train.checkpoint_every=0", f"train.out_dir={tmp_path / 'runs' / 'real'}", *TINY, *extra]


def fast_only(cache: str) -> list[str]:
    """The fast trainer's own settings: no image grids, preparations cached in `cache`."""
    return ["fast.image_every=0", f"fast.prepared_dir={cache}"]


def _cfg_and_args(argv: list[str]):
    parsed = train.parse_args(argv)
    return load_config(parsed.config, parsed.overrides), parsed


def env() -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1")
    e.pop("TRITON_INTERPRET", None)  # the kernels' twins: the same results, without the interpreter's cost
    return e


# ------------------------------------------------------------------------------------------ 1 and 6: run folders
def test_main_job_runs_from_any_folder_and_each_run_gets_its_own_folder(synthetic_root, tmp_path, monkeypatch,
                                                                         capsys):
    elsewhere = tmp_path / "elsewhere"  # outside the repository: no configs/ folder here
    elsewhere.mkdir()
    args = [f"data.synthetic_root={synthetic_root}", "train.out_dir=runs/x", "--image-every", "0", *TINY]
    proc = subprocess.run([sys.executable, "-m", "dsp_fast.train", *args], cwd=elsewhere, env=env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    first = elsewhere / "runs" / "x"
    assert proc.stdout.count(f"run folder: {first}") == 2  # at the start and at the end
    summary = json.loads((first / "summary.json").read_text())
    model = summary["models"]["adapted (DSP)"]
    assert model["steps"] == 2 and len(model["iou"]) == 19 and 1 <= model["classes_evaluated"] <= 19
    final = json.loads((first / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["final"] and final["mIoU"] == pytest.approx(model["mIoU"]) and "road" in final["iou"]
    assert f"(over {model['classes_evaluated']} of 19 classes)" in proc.stdout

    kept = {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()}
    monkeypatch.chdir(elsewhere)
    assert train.main(args) == 0  # the same out_dir again: a new folder, the first run untouched
    assert f"run folder: {elsewhere / 'runs' / 'x_2'}" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()} == kept
    assert (elsewhere / "runs" / "x_2" / "summary.json").is_file()


# ------------------------------------------------------------------------------------------ 2: any order
def test_flags_and_overrides_mix_in_any_order(synthetic_root, tmp_path, capsys):
    args = train.parse_args(["--prepared-target", "X", "train.max_steps=4", "--resume", "data.batch_size=1", "--amp",
                             "fp32"])
    assert (args.prepared_target, args.resume, args.amp) == ("X", "auto", "fp32")
    assert args.overrides == ["train.max_steps=4", "data.batch_size=1"]
    missing = tmp_path / "no_such_prepared"
    code = train.main(["--prepared-target", str(missing), "train.max_steps=4", f"data.synthetic_root={synthetic_root}",
                       f"train.out_dir={tmp_path / 'run'}", "--prepared-source", str(missing)])
    err = capsys.readouterr().err
    assert code == 2 and f"--prepared-source {missing}: folder not found" in err, err
    assert train.main(["stray_word", f"train.out_dir={tmp_path / 'run'}"]) == 2
    assert "stray_word" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing was written


# ------------------------------------------------------------------------------------------ 3: one way to the data
def test_trainer_prepares_the_configured_roots_at_the_configured_sizes_once(synthetic_root, tmp_path):
    gta, cs = small_layout(synthetic_root, tmp_path)
    cache = tmp_path / "cache"
    said: list[str] = []

    def resolve(*extra: str) -> tuple[str, str]:
        cfg = apply_cli_args(*_cfg_and_args(real_args(gta, cs, tmp_path, *fast_only(str(cache)), *extra)))
        return resolve_data(cfg, say=said.append)

    src, tgt = resolve()
    # named after the root, the size, the format (and the format version; the source also after its long-tail set)
    assert os.path.dirname(src) == str(cache) and os.path.basename(src).startswith("gta5_64x36_jpeg_v")
    tgt_folder = os.path.dirname(tgt)
    assert os.path.basename(tgt) == "train" and os.path.basename(tgt_folder).startswith("cityscapes_64x32_jpeg_v")
    manifest = json.loads((cache / src / "manifest.json").read_text())
    assert manifest["size"] == [64, 36] and manifest["source_root"] == gta and len(manifest["stems"]) == 4
    assert Image.open(os.path.join(src, "images", manifest["stems"][0] + ".jpg")).size == (64, 36)
    assert sum("preparing" in s for s in said) == 2
    said.clear()
    assert resolve() == (src, tgt) and not any("preparing" in s for s in said)  # re-used

    # a prepared folder given on the command line must agree with the config; both values are named
    with pytest.raises(DatasetError, match=r"size \[64, 36\], but data.source_size is \[96, 54\]"):
        resolve("--prepared-source", src, "data.source_size=[96,54]")
    # the target's parent folder is enough: its train split is found
    assert resolve("--prepared-target", tgt_folder)[1] == tgt
    with pytest.raises(DatasetError, match=r"wants the 'train' split's folder"):
        resolve("--prepared-target", str(cache))


# ------------------------------------------------------------------------------------------ 4: start-up checks
def test_bad_roots_are_found_before_the_first_step(synthetic_root, tmp_path, capsys):
    gta, cs = small_layout(synthetic_root, tmp_path)
    out = tmp_path / "runs"
    swapped = real_args(cs, gta, tmp_path, *fast_only(str(tmp_path / "cache")))
    assert train.main(swapped) == 2
    err = capsys.readouterr().err
    assert f"data.source_root={cs}: expected the GTA5 (images/, labels/) layout, found a Cityscapes" in err, err
    assert train.main(real_args(gta, str(tmp_path / "nowhere"), tmp_path, *fast_only(str(tmp_path / "cache")))) == 2
    assert f"data.target_root={tmp_path / 'nowhere'}: folder not found" in capsys.readouterr().err
    assert train.main(real_args(gta, cs, tmp_path, *fast_only(str(tmp_path / "cache")), "data.eval_split=test")) == 2
    assert "data.eval_split='test'" in capsys.readouterr().err
    assert reference.main(real_args(cs, gta, tmp_path)) == 2  # the reference trainer checks the same way
    assert "expected the GTA5" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "cache").exists()  # nothing prepared, no run folder


# ------------------------------------------------------------------------------------------ 5: bad files
def test_a_corrupt_source_image_is_named_by_both_trainers(synthetic_root, tmp_path, capsys):
    gta, cs = small_layout(synthetic_root, tmp_path)
    bad = os.path.join(gta, "images", sorted(os.listdir(os.path.join(gta, "images")))[1])
    with open(bad, "r+b") as f:  # a truncated PNG: the header survives, the pixels do not
        f.truncate(200)
    cache = tmp_path / "cache"
    assert train.main(real_args(gta, cs, tmp_path, *fast_only(str(cache)))) == 2
    err = capsys.readouterr().err
    [prepared_src] = [p for p in cache.iterdir() if p.name.startswith("gta5_64x36_jpeg")]
    assert bad in err and "1 of 4 input images" in err and str(prepared_src / "rejects.txt") in err
    assert len(os.listdir(prepared_src / "images")) == 3  # the good ones stay prepared
    assert not (tmp_path / "runs").exists()
    good = os.path.join(gta, "images", sorted(os.listdir(os.path.join(gta, "images")))[0])
    shutil.copy(good, bad)  # the file replaced: the next run prepares just that one and goes on
    data = resolve_data(apply_cli_args(*_cfg_and_args(real_args(gta, cs, tmp_path, *fast_only(str(cache))))))
    assert data[0] == str(prepared_src)
    assert len(os.listdir(prepared_src / "images")) == 4
    with open(bad, "r+b") as f:
        f.truncate(200)

    code = reference.main(real_args(gta, cs, tmp_path, "train.max_steps=10"))
    err = capsys.readouterr().err
    assert code == 2 and bad in err and "Traceback" not in err, err
    last = tmp_path / "runs" / "real" / "reference" / "last.pt"
    assert "checkpoint of step" in err and str(last) in err
    assert torch.load(last, weights_only=True)["step"] < 10  # what was trained is kept


def test_a_corrupt_validation_image_stops_both_trainers_before_the_first_step(synthetic_root, tmp_path, capsys):
    """Until the eval split was decoded at start-up, training ran to the end and only the final evaluation found
    the file (no final figure written)."""
    gta, cs = small_layout(synthetic_root, tmp_path)
    val = os.path.join(cs, "leftImg8bit", "val")
    city = sorted(os.listdir(val))[0]
    bad = os.path.join(val, city, sorted(os.listdir(os.path.join(val, city)))[1])
    with open(bad, "r+b") as f:  # a truncated PNG: the header survives, the pixels do not
        f.truncate(200)
    for main in (train.main, reference.main):
        code = main(real_args(gta, cs, tmp_path, *(fast_only(str(tmp_path / "cache")) if main is train.main else ())))
        out, err = capsys.readouterr()
        assert code == 2 and bad in err and "data.eval_split='val'" in err and "Traceback" not in err, err
        assert "step 1/" not in out, out  # stopped before training
        assert not (tmp_path / "runs").exists()


def test_missing_or_garbage_checkpoints_exit_2_naming_the_file(synthetic_root, tmp_path, capsys):
    assert evaluate.main(["--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert f"checkpoint not found: {tmp_path / 'nope.pt'}" in capsys.readouterr().err
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(300))
    assert evaluate.main(["--checkpoint", str(garbage)]) == 2
    err = capsys.readouterr().err
    assert str(garbage) in err and "weights_only" not in err, err
    args = [f"data.synthetic_root={synthetic_root}", f"train.out_dir={tmp_path / 'run'}", *TINY]
    assert train.main(["--resume", str(garbage), *args]) == 2
    err = capsys.readouterr().err
    assert f"--resume: {garbage} is not a readable checkpoint" in err and "weights_only" not in err, err
    assert garbage.read_bytes() and not (tmp_path / "run").exists()


def test_prepare_resizes_gta5_pairs_of_different_sizes_and_counts_them(synthetic_root, tmp_path, capsys):
    gta, _ = small_layout(synthetic_root, tmp_path, n_source=2)
    label = os.path.join(gta, "labels", sorted(os.listdir(os.path.join(gta, "labels")))[0])
    with Image.open(label) as im:
        im.resize((im.width * 2, im.height * 2), Image.Resampling.NEAREST).save(label)  # keeps the palette
    out = tmp_path / "prepared"
    code = prepare.main(["--dataset", "gta5", "--root", gta, "--out", str(out), "--size", "64", "36",
                         "--no-progress", "--workers", "1"])
    assert code == 0
    assert "1 image/label pairs of different sizes, both resized" in capsys.readouterr().out
    stem = os.path.splitext(os.path.basename(label))[0]
    assert Image.open(out / "labels" / f"{stem}.png").size == (64, 36)


# ------------------------------------------------------------------------------------------ 7: figures
def test_eta_is_smoothed_over_log_intervals(tmp_path, monkeypatch, capsys):
    from dsp_fast import run_io

    clock = iter([0.0, 1.0, 2.0, 12.0, 13.0])  # one slow interval of 10 s among 1 s ones
    monkeypatch.setattr(run_io.time, "perf_counter", lambda: next(clock))
    log = run_io.RunLog(load_config(None, ["train.log_every=1"]), str(tmp_path), "t")
    log.start(100, 2)
    for step in range(1, 5):
        log.step(step, {"loss": 1.0})
    log.close()
    etas = []
    for line in capsys.readouterr().out.splitlines():
        h, m, sec = (int(v) for v in line.rsplit("ETA ", 1)[1].split(":"))
        etas.append(3600 * h + 60 * m + sec)
    assert etas[:2] == [99, 98]  # 1 s per step
    # one interval of 10 s per step: unsmoothed, the ETA would jump to 97 x 10 s and straight back down
    assert 98 < etas[2] < 0.3 * 97 * 10 and etas[2] > etas[3] > 98


# ------------------------------------------------------------------------------------------ 9: image grid
def test_image_grid_has_column_captions_and_a_class_legend():
    rng = np.random.default_rng(0)
    rows = [[rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in GRID_COLUMNS] for _ in range(2)]
    names = [f"class{i}" for i in range(19)]
    grid = np.asarray(labelled_grid(rows, names))
    assert grid.shape[1] == 6 * 32 and grid.shape[0] > CAPTION_H + 2 * 32 + 10  # caption row above, legend below
    assert np.array_equal(grid[CAPTION_H:CAPTION_H + 64], np.concatenate([np.concatenate(r, 1) for r in rows], 0))
    legend = grid[CAPTION_H + 64:].reshape(-1, 3)
    for colour in PALETTE[:19]:  # every class's swatch is drawn
        assert (legend == colour).all(1).any(), colour
    assert (grid[:CAPTION_H] < 128).any()  # caption text
