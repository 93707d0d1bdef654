"""The fast path's weighted MMD on a CPU (the adjoint map from two interpolation matrices, no Triton) at the paper's
shapes (B=2, 256x65x65 features, 512x512 crop), forward + backward: the tensor bytes alive at its peak
(bench.memory.LiveBytes) are at most a quarter of the naive twin's and far below one full-resolution feature map,
with the same loss and gradients (1e-5 relative: float32, the two sum the same products in different orders)."""

from __future__ import annotations

import pytest
import torch

from bench.kernel_cases import PAPER_FEATURES, feature_inputs, upsampled_bytes
from bench.memory import LiveBytes
from dsp_fast import kernels


def peak_loss_grads(fn) -> tuple[int, float, list[float]]:
    feat_s, feat_t, mask = feature_inputs(*PAPER_FEATURES, density=0.5, grad=True,
                                          gen=torch.Generator().manual_seed(0))
    with LiveBytes() as live:
        loss = fn(feat_s, feat_t, mask, PAPER_FEATURES[3])
        loss.backward()
    return live.peak, float(loss), [float(feat_s.grad.norm()), float(feat_t.grad.norm())]


def test_cpu_weighted_mmd_needs_a_quarter_of_the_naive_memory(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")  # the CPU user's path: the adjoint's plain-PyTorch operators
    naive, adjoint = peak_loss_grads(kernels.twins.weighted_mmd), peak_loss_grads(kernels.weighted_mmd)
    b, c, _, size = PAPER_FEATURES
    assert adjoint[0] <= naive[0] / 4, (naive[0] / 2**20, adjoint[0] / 2**20)
    assert adjoint[0] < upsampled_bytes(b, c, size) / 8  # never a full-resolution feature map (512 MiB)
    assert adjoint[1] == pytest.approx(naive[1], rel=1e-5)
    assert adjoint[2] == pytest.approx(naive[2], rel=1e-5)
