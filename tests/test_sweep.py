"""python -m dsp_fast.sweep: two seeds of a tiny run on the synthetic shift, each run folder kept, the table and
JSON of per-class IoU and mIoU as mean +- std over the seeds."""

from __future__ import annotations

import json
import os
import statistics

import pytest

from dsp_fast import sweep


def test_two_seeds_give_mean_and_std_per_class_and_keep_each_run(synthetic_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the kernels' twins in the trainer's processes
    out = tmp_path / "sweep"
    code = sweep.main(["--config", "synthetic", "--seeds", "0", "1", "--out", str(out), "--image-every", "0",
                       f"data.synthetic_root={synthetic_root}", "train.max_steps=2", "data.crop_size=[32,32]",
                       "data.eval_size=[64,32]", "data.max_eval_images=2", "train.log_every=0"])
    printed = capsys.readouterr().out
    assert code == 0, printed[-3000:]
    record = json.loads((out / "sweep.json").read_text())
    assert record["seeds"] == [0, 1] == record["finished"]
    assert set(record["models"]) == {"source-only", "adapted (DSP)"}  # the preset's comparison, both kept
    for seed in (0, 1):
        summary = json.loads((out / f"seed_{seed}" / "summary.json").read_text())
        assert os.path.samefile(record["runs"][str(seed)], out / f"seed_{seed}")
        for name, model in summary["models"].items():
            assert record["models"][name]["mIoU"]["values"][seed] == model["mIoU"]
            with open(os.path.join(model["folder"], "config.yaml")) as f:
                assert f"seed: {seed}" in f.read()
    dsp = record["models"]["adapted (DSP)"]
    values = dsp["mIoU"]["values"]
    assert dsp["mIoU"]["mean"] == pytest.approx(statistics.fmean(values))
    assert dsp["mIoU"]["std"] == pytest.approx(statistics.stdev(values))
    assert len(dsp["iou"]) == 19 and dsp["teacher_mIoU"]["n"] == 2
    table = (out / "sweep.md").read_text()
    assert "| **mIoU19** (student) |" in table and "+-" in table and "| road |" in table and table.strip() in printed


def test_a_bad_config_or_a_seed_override_stops_before_the_first_run(tmp_path, capsys):
    assert sweep.main(["--seeds", "0", "1", "dsp.lam=3", "--out", str(tmp_path / "s")]) == 2
    assert "dsp.lam" in capsys.readouterr().err
    assert sweep.main(["--seeds", "0", "train.seed=4", "--out", str(tmp_path / "s")]) == 2
    assert "sets train.seed" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
