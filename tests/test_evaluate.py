"""Confusion matrix, IoU and mIoU against cases computed by hand."""

import math

import pytest
import torch

from dsp_fast.evaluate import confusion_matrix, format_iou_table, iou_from_confusion, mean_iou, miou_variants


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
