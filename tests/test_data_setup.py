"""How the trainers reach their data: the configured roots are prepared at the configured sizes once (named after
root, size and format) and re-used; a prepared folder given on the command line must agree with the config; every
root is checked at start-up (layout, split, every file decodable, the validation split included), before the first
step and before anything is written; a corrupt file is named by both trainers, exit code 2."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from PIL import Image

from dsp_fast import reference, train
from dsp_fast.config import apply_cli_args, load_config
from dsp_fast.data import DatasetError
from dsp_fast.engine.data_setup import resolve_data

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
    """The eval split is decoded at start-up too: otherwise training would run to the end and only the final
    evaluation would find the file, with no final figure written."""
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
