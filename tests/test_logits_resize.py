"""How logits are resized to the image or label size, per model: bilinear with align_corners=True for DeepLab (the
DSP script) and False for MiT + DAFormer (DAFormer's decode head and segmentor), in both trainers' `seg_forward`
(the losses) and in evaluation. The expected values are F.interpolate of the model's raw logits with the flag the
spec gives for that architecture, written here, not read from the model.

Tolerance: none (torch.equal), except for the fast trainer's resize on CPU: `kernels.upsample_bilinear` computes it
as two matrix products there, equal to rounding (1e-5), while the two flags differ by far more (checked). Elsewhere
each side runs the same operators on the same inputs in eval mode, so the results are bit for bit the same; every
case also checks that the two flags give different results at its size, so that a wrong flag cannot pass.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dsp_fast import evaluate, method, reference
from dsp_fast.config import ModelConfig
from dsp_fast.models import build_model, normalize_input

CPU = torch.device("cpu")
# the resize docs/method.md gives each model: DeepLab as the DSP script, MiT + DAFormer as DAFormer's code
SPEC_ALIGN = {"tiny": True, "mit_b0": False}
H, W = 45, 61  # odd, unequal sides: logits 6x8 (DeepLab, stride 8) or 12x16 (MiT, stride 4) resized to 45x61


def build(arch: str) -> torch.nn.Module:
    cfg = ModelConfig(arch=arch, num_classes=5, decoder_dim=32) if arch.startswith("mit") else ModelConfig(
        arch=arch, num_classes=5)
    return build_model(cfg).eval()  # eval: no dropout or drop path, so two forwards agree bit for bit


class Wrapper(torch.nn.Module):
    """Holds the model as `.module`, as DDP does (the fast trainer's student when distributed)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor):
        return self.module(x)


def resized(model: torch.nn.Module, x: torch.Tensor, align: bool) -> tuple[torch.Tensor, torch.Tensor]:
    logits, feat = model(normalize_input(x, model.input_kind))
    return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=align), feat


@pytest.mark.parametrize("arch", list(SPEC_ALIGN))
@pytest.mark.parametrize("trainer", ["fast", "reference"])
def test_seg_forward_resizes_as_the_spec(arch, trainer):
    model = build(arch)
    x = torch.rand(2, 3, H, W)
    with torch.no_grad():
        if trainer == "fast":
            got, feat = method.seg_forward(Wrapper(model), x, lambda t: normalize_input(t, model.input_kind))
        else:
            got, feat = reference.seg_forward(model, x)
        want, want_feat = resized(model, x, SPEC_ALIGN[arch])
        other, _ = resized(model, x, not SPEC_ALIGN[arch])
    assert got.shape == (2, 5, H, W)
    assert (want - other).abs().max() > 1e-2  # the flag matters at this size, far beyond the tolerance
    if trainer == "fast":
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, want)
    assert torch.equal(feat, want_feat)  # the MMD features are passed on at their own stride, never resized


@pytest.mark.parametrize("arch", list(SPEC_ALIGN))
@pytest.mark.parametrize("wrapped", [False, True])
def test_evaluation_resizes_as_the_spec(arch, wrapped):
    model = build(arch)
    image = np.random.default_rng(0).integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255)
    with torch.no_grad():
        want = resized(model, x, SPEC_ALIGN[arch])[0].argmax(1)[0]
        other = resized(model, x, not SPEC_ALIGN[arch])[0].argmax(1)[0]
    assert not torch.equal(want, other)  # some pixel's class depends on the flag
    got = evaluate.predict(Wrapper(model) if wrapped else model, image, CPU)
    assert torch.equal(got, want)
