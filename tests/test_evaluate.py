"""Confusion matrix, IoU and mIoU against cases computed by hand; the CLI run from another folder than the
training's."""

import json
import math
import os

import pytest
import torch

from dsp_fast import evaluate
from dsp_fast.checkpoint_file import atomic_torch_save
from dsp_fast.config import load_config
from dsp_fast.evaluate import confusion_matrix, format_iou_table, iou_from_confusion, mean_iou, miou_variants
from dsp_fast.models import build_model


def test_confusion_and_iou_by_hand():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    conf = confusion_matrix(pred, label, num_classes=3)
    # rows = truth: class 0: (0->0, 0->1); class 1: (1->1, 1->1); class 2: (2->2, 2->0); the 255 pixels are dropped
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    iou = iou_from_confusion(conf)
    # class 0: tp 1, fp 1 (a 2 predicted as 0), fn 1 -> 1/3; class 1: tp 2, fp 1, fn 0 -> 2/3; class 2: 1/(1+0+1)
    assert iou.tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert mean_iou(iou) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)


def test_absent_class_is_nan_and_excluded():
    conf = torch.tensor([[3, 0, 0], [0, 0, 0], [0, 0, 1]])
    iou = iou_from_confusion(conf)
    assert math.isnan(iou[1]) and mean_iou(iou) == pytest.approx(1.0)
    # a class only predicted (never in the labels) counts as IoU 0
    conf = torch.tensor([[3, 1, 0], [0, 0, 0], [0, 0, 1]])
    assert iou_from_confusion(conf)[1] == 0


def test_variants_and_table():
    iou = torch.linspace(0, 1, 16, dtype=torch.float64)
    variants = miou_variants(iou)
    keep = [i for i in range(16) if i not in (3, 4, 5)]
    assert variants["mIoU16"] == pytest.approx(float(iou.mean()))
    assert variants["mIoU13"] == pytest.approx(float(iou[keep].mean()))
    table = format_iou_table(torch.full((19,), 0.5, dtype=torch.float64))
    assert "road" in table and "bicycle" in table and "mIoU19" in table and "50.0" in table


def test_bad_labels_rejected():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.zeros(2, 2), torch.tensor([[0, 7], [1, 255]]), num_classes=3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(2, 3), torch.zeros(2, 2), num_classes=3)


def test_evaluate_from_another_folder_reads_the_runs_data(synthetic_root, tmp_path, monkeypatch, capsys):
    """A run started in train/ with the relative data.synthetic_root=data/syn, evaluated from elsewhere: the data of
    train/ is read (provenance.json's cwd), none is generated in the current folder."""
    started = tmp_path / "train"
    os.makedirs(started / "data")
    os.symlink(synthetic_root, started / "data" / "syn")  # the run's generated data, where the run made it
    cfg = load_config("synthetic", ["data.synthetic_root=data/syn", "data.crop_size=[32,32]",
                                    "data.eval_size=[64,32]", "data.max_eval_images=1"])
    run = started / "runs" / "synthetic"
    os.makedirs(run / "dsp")
    (run / "provenance.json").write_text(json.dumps({"cwd": str(started)}))
    model = build_model(cfg.model)
    atomic_torch_save({"student": model.state_dict(), "teacher": model.state_dict(), "config": cfg.to_dict(),
                       "input_kind": "torchvision"}, str(run / "dsp" / "ckpt_00000002.pt"))
    elsewhere = tmp_path / "elsewhere"
    os.makedirs(elsewhere)
    monkeypatch.chdir(elsewhere)
    assert evaluate.main(["--checkpoint", str(run), "--device", "cpu", "--json", "iou.json"]) == 0
    out = capsys.readouterr().out
    assert f"evaluating the val split of {started / 'data' / 'syn' / 'cityscapes'} (the run's relative data paths " \
           f"resolved against {started}, where it ran), whole" in out
    assert sorted(os.listdir(elsewhere)) == ["iou.json"]  # no data/ generated here
    assert evaluate.main(["--checkpoint", str(run), "--device", "cpu", "--mode", "slide", "--flip"]) == 0
    assert "cityscapes (the run's relative data paths resolved against" in (out := capsys.readouterr().out)
    assert "where it ran), slide, window 32x32, stride 21x21, flip" in out  # the crop, 2/3 of it
