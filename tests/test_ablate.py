"""python -m dsp_fast.ablate: the rows derived from the config; with a stand-in trainer (no training) the figures,
the table, the JSON, the chart, continuing a partly finished ablation and two ablations at once; and one tiny
ablation that really trains every row on CPU."""

from __future__ import annotations

import json
import os
import statistics
import sys

import pytest
from PIL import Image

from dsp_fast import ablate
from dsp_fast.config import ConfigError, load_config
from dsp_fast.data.labels import class_names

SEEDS = ["--seeds", "0", "1", "2"]
TRAINED = 5  # rows with runs of their own: all but source-only, the DSP run's twin


def test_rows_are_derived_from_the_config():
    rows = {p.row.key: p for p in ablate.plan_rows(load_config("synthetic"))}
    assert [p.row.key for p in ablate.plan_rows(load_config("synthetic"))] == [r.key for r in ablate.ROWS]
    assert rows["source_only"].switches == {"dsp.enabled": False}
    assert rows["dacs"].switches == {"dsp.template": "source", "dsp.source_mix": False, "dsp.lam": 1.0,
                                     "dsp.num_long_tail": 0, "dsp.mmd_weight": 0.0}
    assert [rows[k].switches["dsp.lam"] for k in ("soft_paste", "dual", "long_tail", "dsp")] == [0.9] * 4
    assert rows["dual"].switches["dsp.template"] == "separate" and rows["dual"].switches["dsp.source_mix"] is True
    assert rows["long_tail"].switches["dsp.num_long_tail"] == 2 and rows["long_tail"].switches["dsp.mmd_weight"] == 0
    assert rows["dsp"].switches["dsp.mmd_weight"] == 1e-4 and rows["dsp"].overrides == {}  # the config itself
    assert rows["soft_paste"].overrides == {"dsp.template": "source", "dsp.source_mix": False,
                                            "dsp.num_long_tail": 0, "dsp.mmd_weight": 0.0}  # lam is the config's
    # the config's own values, not copies: another lam and long-tail count move with it
    other = {p.row.key: p for p in ablate.plan_rows(load_config("synthetic", ["dsp.lam=0.8", "dsp.num_long_tail=3"]))}
    assert other["soft_paste"].switches["dsp.lam"] == 0.8 and other["long_tail"].overrides == {"dsp.mmd_weight": 0.0}
    assert other["dacs"].switches["dsp.num_long_tail"] == 0 and other["dsp"].switches["dsp.num_long_tail"] == 3
    # only the last row's run trains the source-only twin
    assert {k: w[-1] for k, w in ablate.run_overrides(list(rows.values())).items()} == {
        "dacs": "train.compare_source_only=false", "soft_paste": "train.compare_source_only=false",
        "dual": "train.compare_source_only=false", "long_tail": "train.compare_source_only=false",
        "dsp": "train.compare_source_only=true"}
    with pytest.raises(ConfigError, match="dsp.template=separate"):
        ablate.plan_rows(load_config("synthetic_dacs"))
    with pytest.raises(ConfigError, match="dsp.enabled"):
        ablate.plan_rows(load_config("synthetic", ["dsp.enabled=false"]))


def _score(cmd: list[str], seed: int) -> float:
    """The stand-in's mIoU: each DSP piece a row lacks costs one point (DACS lacks five, DSP none), plus a tenth of
    a point per seed, so rows, steps and spreads are known exactly."""
    return 0.40 - 0.01 * sum(w.startswith("dsp.") for w in cmd) + 0.001 * seed


class FakeTrainer:
    """Stands in for `python -m dsp_fast.train`: writes the summary.json a finished run would (the models the
    trainer names, 19 classes with 'train' never present), or fails with exit code 3 at call number `fail_at`."""

    def __init__(self, fail_at: int | None = None):
        self.calls: list[list[str]] = []
        self.fail_at = fail_at

    def __call__(self, cmd: list[str], out: str) -> tuple[int, str]:
        self.calls.append(cmd)
        os.makedirs(out, exist_ok=True)
        if len(self.calls) == self.fail_at:
            return 3, out
        words = dict(w.split("=", 1) for w in cmd if "=" in w)
        seed, score = int(words["train.seed"]), _score(cmd, int(words["train.seed"]))

        def model(miou: float, teacher: bool) -> dict:
            iou = {c: (None if c == "train" else miou) for c in class_names(19)}
            return {"mIoU": miou, "classes_evaluated": 18, "num_classes": 19, "iou": iou,
                    **({"teacher_mIoU": miou + 0.005} if teacher else {})}

        models = {"adapted (DSP)": model(score, True)}
        if words["train.compare_source_only"] == "true":
            models = {"source-only": model(0.30 + 0.001 * seed, False), **models}
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump({"run_dir": out, "models": models}, f)
        return 0, out


def test_figures_table_json_and_chart_from_a_stand_in_trainer(tmp_path, capsys):
    fake = FakeTrainer()
    out = tmp_path / "abl"
    assert ablate.main(["--config", "synthetic", *SEEDS, "--out", str(out), "--image-every", "0"], runner=fake) == 0
    printed = capsys.readouterr().out
    assert len(fake.calls) == 3 * TRAINED  # source-only is not trained on its own
    assert sum("train.compare_source_only=true" in c for c in fake.calls) == 3
    assert all("--image-every" in c and "--resume" not in c for c in fake.calls)
    record = json.loads((out / "ablation.json").read_text())
    assert record["finished"] and record["plan"]["seeds"] == [0, 1, 2] and record["plan"]["config"] == "synthetic"
    assert "dsp_fast.ablate" in record["command"] and record["date"] and "sha" in record["git"]
    rows = {r["key"]: r for r in record["rows"]}
    assert [r["name"] for r in record["rows"]] == [r.name for r in ablate.ROWS]
    # exact up to float rounding (1e-12): mean and sample std of the stand-in's known values
    for key, base in (("source_only", 0.30), ("dacs", 0.35), ("soft_paste", 0.36), ("dual", 0.38),
                      ("long_tail", 0.39), ("dsp", 0.40)):
        values = [base + 0.001 * s for s in (0, 1, 2)]
        m = rows[key]["mIoU"]
        assert m["values"] == pytest.approx(values, abs=1e-12)
        assert m["mean"] == pytest.approx(statistics.fmean(values), abs=1e-12)
        assert m["std"] == pytest.approx(statistics.stdev(values), abs=1e-12) and m["n"] == 3
        assert [v["mIoU"] for v in rows[key]["per_seed"].values()] == pytest.approx(values, abs=1e-12)
        assert rows[key]["iou"]["road"]["mean"] == pytest.approx(statistics.fmean(values), abs=1e-12)
        assert rows[key]["iou"]["train"]["n"] == 0 and rows[key]["iou"]["train"]["mean"] is None
    assert [rows[k]["step"] for k in ("dacs", "soft_paste", "dual", "long_tail", "dsp")] == pytest.approx(
        [0.05, 0.01, 0.02, 0.01, 0.01], abs=1e-12)
    assert rows["source_only"]["step"] is None and rows["source_only"]["teacher_mIoU"]["mean"] is None
    assert rows["dsp"]["teacher_mIoU"]["mean"] == pytest.approx(0.406, abs=1e-12)
    assert rows["source_only"]["per_seed"]["1"]["run"] == rows["dsp"]["per_seed"]["1"]["run"]  # one run, two rows
    assert rows["dacs"]["overrides"]["dsp.lam"] == 1.0 and rows["dsp"]["overrides"] == {}
    table = (out / "ablation.md").read_text()
    assert "| + soft paste | `dsp.template=source dsp.source_mix=false dsp.num_long_tail=0 dsp.mmd_weight=0.0` | " \
           "36.1 +- 0.1 (0: 36.0, 1: 36.1, 2: 36.2) | +1.0 | 36.6 +- 0.1 |" in table
    assert "| source-only | `dsp.enabled=false` | 30.1 +- 0.1 (0: 30.0, 1: 30.1, 2: 30.2) |  | n/a |" in table
    assert "| + weighted MMD (= DSP) | `(the config)` |" in table
    assert "## Per-class IoU" in table and "| road | 30.1 +- 0.1 | 35.1 +- 0.1 |" in table
    assert table.strip() in printed
    png = out / "ablation.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:  # a readable chart: six labelled bars, not a thumbnail nor a poster
        assert 600 <= im.width <= 2000 and 300 <= im.height <= 2000


def test_the_same_command_continues_a_partly_finished_ablation(tmp_path, capsys):
    args = ["--config", "synthetic", *SEEDS, "--out", str(tmp_path / "abl")]
    failing = FakeTrainer(fail_at=4)
    assert ablate.main(args, runner=failing) == 3  # the first failing run's exit code
    record = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert not record["finished"] and len(record["rows"][1]["per_seed"]) == 1  # DACS of seed 0 finished
    assert "| + long-tail first |" in (tmp_path / "abl" / "ablation.md").read_text()
    again = FakeTrainer()
    assert ablate.main(args, runner=again) == 0
    assert len(again.calls) == 3 * TRAINED - 3  # the three finished runs are read, not trained again
    assert "--resume" in again.calls[0] and "dsp.template=source" not in again.calls[0]  # the failed one goes on
    assert all("--resume" not in c for c in again.calls[1:])
    assert not (tmp_path / "abl_2").exists()
    assert json.loads((tmp_path / "abl" / "ablation.json").read_text())["finished"]
    fresh = FakeTrainer()  # a finished ablation is not continued: the same command starts a new one
    assert ablate.main(args, runner=fresh) == 0 and len(fresh.calls) == 3 * TRAINED
    assert (tmp_path / "abl_2" / "ablation.json").exists()
    assert "ablation folder" in capsys.readouterr().out


def test_ctrl_c_names_the_command_that_continues(tmp_path, capsys):
    class Interrupted(FakeTrainer):
        def __call__(self, cmd, out):
            if len(self.calls) == 2:  # Ctrl-C while the third run trains
                raise KeyboardInterrupt
            return super().__call__(cmd, out)

    args = ["--config", "synthetic", "--seeds", "0", "--out", str(tmp_path / "abl")]
    assert ablate.main(args, runner=Interrupted()) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "-m dsp_fast.ablate" in err and "--seeds 0" in err
    again = FakeTrainer()
    assert ablate.main(args, runner=again) == 0 and len(again.calls) == TRAINED - 2  # the two finished runs stand


def test_two_ablations_at_once_never_share_a_folder(tmp_path):
    args = ["--config", "synthetic", "--seeds", "0", "--out", str(tmp_path / "abl")]
    assert ablate.main(args, runner=FakeTrainer(fail_at=1)) == 3
    plan = json.loads((tmp_path / "abl" / "ablation.json").read_text())["plan"]
    folder, lock, earlier = ablate.claim_folder(str(tmp_path / "abl"), plan)  # as a second start of it would
    assert folder == str(tmp_path / "abl") and earlier is not None  # continued, and held while this one runs
    try:
        assert ablate.main(args, runner=FakeTrainer()) == 0
    finally:
        lock.close()
    assert json.loads((tmp_path / "abl_2" / "ablation.json").read_text())["finished"]
    assert not json.loads((tmp_path / "abl" / "ablation.json").read_text())["finished"]  # left to its owner
    other = ["--config", "synthetic", "--seeds", "0", "1", "--out", str(tmp_path / "abl")]
    assert ablate.main(other, runner=FakeTrainer()) == 0 and (tmp_path / "abl_3").exists()  # another plan


def test_bad_settings_stop_before_anything_is_made(tmp_path, capsys):
    out = tmp_path / "abl"
    for words, said in ((["train.compare_source_only=false"], "sets train.seed"), (["dsp.lam=3"], "dsp.lam"),
                        (["--config", "synthetic_dacs"], "dsp.template"), (["--resume"], "--resume")):
        assert ablate.main(["--seeds", "0", "--out", str(out), *words], runner=FakeTrainer()) == 2
        assert said in capsys.readouterr().err
    assert not out.exists()


def test_matplotlib_missing_is_one_line_and_the_table_is_still_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    assert ablate.main(["--seeds", "0", "--out", str(tmp_path / "abl")], runner=FakeTrainer()) == 0
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert (tmp_path / "abl" / "ablation.md").exists() and not (tmp_path / "abl" / "ablation.png").exists()


def test_trains_every_row_end_to_end_on_cpu(synthetic_root, tmp_path, capsys, monkeypatch):
    """TRAINS: the real trainer, five runs of 2 steps each (seed 0, 32x32 crops, two evaluation images)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the kernels' twins in the trainer's processes
    out = tmp_path / "abl"
    code = ablate.main(["--config", "synthetic", "--seeds", "0", "--out", str(out), "--image-every", "0",
                        "--no-tensorboard", f"data.synthetic_root={synthetic_root}", "train.max_steps=2",
                        "data.crop_size=[32,32]", "data.eval_size=[64,32]", "data.max_eval_images=2",
                        "train.log_every=0"])
    printed = capsys.readouterr().out
    assert code == 0, printed[-3000:]
    record = json.loads((out / "ablation.json").read_text())
    assert record["finished"] and len(record["rows"]) == len(ablate.ROWS)
    for row in record["rows"]:
        run = row["per_seed"]["0"]["run"]
        with open(os.path.join(run, "summary.json")) as f:
            summary = json.load(f)
        assert row["mIoU"]["values"] == [row["per_seed"]["0"]["mIoU"]]
        assert row["per_seed"]["0"]["mIoU"] in [m["mIoU"] for m in summary["models"].values()]
        assert os.path.basename(os.path.dirname(run)) == row["trained_in"]
    with open(out / "dacs" / "seed_0" / "config.yaml") as f:
        saved = f.read()
    assert "template: source" in saved and "lam: 1.0" in saved and "compare_source_only: false" in saved
    assert (out / "dsp" / "seed_0" / "source_only").is_dir()  # the twin trained beside DSP, once
    assert not (out / "source_only").exists()
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
