"""Whole, sliding-window and flipped inference (dsp_fast/inference.py) against values worked out by hand with stub
models whose logits are a known function of the input."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from dsp_fast.config import ConfigError, ModelConfig, load_config
from dsp_fast.inference import (
    Inference,
    add_inference_flags,
    image_logits,
    inference_from_flags,
    predict_batch,
    slide_logits,
    window_starts,
)
from dsp_fast.models import build_model


class ColumnStub(torch.nn.Module):
    """Logits at the input's own size: channel 0 = the column index within the input it is given (so a window
    sees 0, 1, 2, ... from its own left edge), channel 1 = the input's first channel."""

    logits_align_corners = True

    def forward(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, None]:
        b, _, h, w = x_BCHW.shape
        column = torch.arange(w, dtype=x_BCHW.dtype).expand(b, 1, h, w)
        return torch.cat([column, x_BCHW[:, :1]], 1), None


def test_window_grid_ends_at_the_border():
    assert window_starts(1024, 512, 341) == [0, 341, 512]  # mmseg's 512 / 341 on a 1024-wide image
    assert window_starts(7, 4, 2) == [0, 2, 3]  # the last window moved back to end at the border
    assert window_starts(512, 512, 341) == [0]
    assert window_starts(3, 4, 2) == [0]  # shorter than the window: one window of the side's length


def test_two_overlapping_windows_average_by_hand():
    x = torch.zeros(1, 3, 2, 6)
    x[0, 0] = torch.arange(12, dtype=torch.float32).reshape(2, 6)
    got = slide_logits(ColumnStub(), x, window=(4, 2), stride=(2, 2))
    # windows over columns 0-3 and 2-5: channel 0 is 0 1 2 3 in the first, 0 1 2 3 in the second (from column 2);
    # columns 2 and 3 are covered twice: (2 + 0) / 2 = 1 and (3 + 1) / 2 = 2. Halves of small integers: exact.
    assert got[0, 0].tolist() == [[0, 1, 1, 2, 2, 3]] * 2
    assert torch.equal(got[0, 1], x[0, 0])  # a value of the input itself, averaged with itself, stays itself


def test_image_smaller_than_the_window_is_one_window():
    x = torch.rand(2, 3, 5, 3)
    assert torch.equal(slide_logits(ColumnStub(), x, window=(8, 8), stride=(5, 5)), ColumnStub()(x)[0])


def test_slide_with_one_window_is_whole():
    model = build_model(ModelConfig(arch="tiny", num_classes=19)).eval()
    images = [np.random.default_rng(i).integers(0, 256, (40, 56, 3), dtype=np.uint8) for i in range(2)]
    whole = predict_batch(model, images, torch.device("cpu"))
    slide = predict_batch(model, images, torch.device("cpu"), how=Inference("slide", (56, 40), (37, 26)))
    # the same forward on the same batch and the same upsampling to the same size: equal exactly (tolerance 0)
    assert all(torch.equal(a, b) for a, b in zip(whole, slide))


def test_flip_averages_with_the_mirrored_input_mirrored_back():
    x = torch.rand(1, 3, 4, 7)
    plain = next(image_logits(ColumnStub(), x, [(4, 7)]))
    flipped = next(image_logits(ColumnStub(), x, [(4, 7)], Inference(flip=True)))
    assert plain[0, 0, 0].tolist() == list(range(7))
    # column j sees j in the plain pass and 6 - j in the mirrored one: (j + 6 - j) / 2 = 3 everywhere (exact)
    assert torch.equal(flipped[0, 0], torch.full((4, 7), 3.0))
    assert torch.equal(flipped[0, 1], x[0, 0])  # the input's own values: mirrored twice, averaged with themselves
    slide = next(image_logits(ColumnStub(), x, [(4, 7)], Inference("slide", (4, 4), (3, 3), flip=True)))
    # windows at columns 0 and 3 (0 1 2 3 / 0 1 2 3): columns 3 -> (3 + 0) / 2; mirrored the same; flip of it
    one = torch.tensor([0, 1, 2, 1.5, 1, 2, 3])
    assert torch.equal(slide[0, 0, 0], (one + one.flip(0)) / 2)


def test_flags_defaults_and_errors():
    parser = argparse.ArgumentParser()
    add_inference_flags(parser)
    cfg = load_config("synthetic", [])  # crop 128x128
    how = inference_from_flags(parser.parse_args(["--mode", "slide"]), cfg)
    assert how == Inference("slide", (128, 128), (85, 85), False)  # window = crop, stride = 2/3 of it rounded down
    how = inference_from_flags(parser.parse_args(["--mode", "slide", "--window", "64", "32", "--flip"]), cfg)
    assert (how.window, how.stride, how.flip) == ((64, 32), (42, 21), True)
    with pytest.raises(ConfigError, match="--mode slide"):
        inference_from_flags(parser.parse_args(["--window", "64", "32"]), cfg)
    with pytest.raises(ConfigError, match="--stride 65 8 is larger than --window 64 32"):
        inference_from_flags(parser.parse_args(["--mode", "slide", "--window", "64", "32", "--stride", "65", "8"]),
                             cfg)
    with pytest.raises(ConfigError, match="--window"):
        Inference("slide", (0, 4), (1, 1))
