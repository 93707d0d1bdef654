"""The reference trainer and the evaluation CLI end to end on a freshly generated synthetic dataset."""

import json

import pytest
import torch

from dsp_fast import evaluate, reference


def test_reference_then_evaluate(tmp_path, capsys):
    out = tmp_path / "run" / "reference"
    args = ["--config", "synthetic", f"train.out_dir={out.parent}",
            f"data.synthetic_root={tmp_path / 'syn'}",
            "train.max_steps=3", "train.log_every=1", "data.max_eval_images=3", "train.compare_source_only=true",
            "data.crop_size=[64, 64]"]
    assert reference.main(args) == 0
    printed = capsys.readouterr().out
    assert "source-only" in printed and "adapted (DSP)" in printed and "mIoU19" in printed
    assert "target IoU of the student" in printed and "teacher mIoU" in printed  # which model is scored, said
    summary = json.loads((out / "summary.json").read_text())
    assert all(m["scored"] == "student" and 0 <= m["teacher_mIoU"] <= 1 for m in summary["models"].values())
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["git"] and provenance["torch"] == torch.__version__ and provenance["device"]
    for sub in ("source_only", "dsp"):
        lines = (out / sub / "metrics.jsonl").read_text().splitlines()
        steps = [json.loads(line) for line in lines if "loss" in json.loads(line)]
        assert [s["step"] for s in steps] == [1, 2, 3] and all(s["img_per_s"] > 0 for s in steps)
        assert (out / sub / "config.yaml").is_file()
    ckpt = torch.load(out / "dsp" / "last.pt", weights_only=True)
    assert ckpt["step"] == 3 and set(ckpt) >= {"student", "teacher", "optimizer", "config", "input_kind"}
    report = tmp_path / "iou.json"
    assert evaluate.main(["--checkpoint", str(out / "dsp" / "last.pt"), "--json", str(report),
                          "data.max_eval_images=3"]) == 0
    figures = json.loads(report.read_text())
    # the evaluation CLI restores the trained student and the eval settings: the reference's own final figure
    assert len(figures["iou"]) == 19
    assert figures["mIoU19"] == pytest.approx(summary["models"]["adapted (DSP)"]["mIoU"], abs=1e-12)


def test_bad_config_exits_with_the_field(capsys):
    assert reference.main(["--config", "synthetic", "dsp.lam=3"]) == 2
    assert "dsp.lam" in capsys.readouterr().err
