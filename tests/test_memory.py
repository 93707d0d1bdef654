"""The memory prediction (`python -m bench.memory`) on a CPU: each trainer's step predicted on fake tensors against
the same step on real CPU tensors (`tiny`, 48x48 crops, the kernels as this machine runs them on both sides)."""

from __future__ import annotations

import torch

from bench.memory import TRAINERS, check_on_cpu
from dsp_fast.config import load_config
from dsp_fast.models import build_student_teacher


def test_prediction_matches_real_cpu_step():
    """Live tensor bytes of the real step: within 0.5% of the fake prediction (the same bookkeeping on both sides, so
    a larger gap means the fake step, its fake models or its loader batch allocate differently from the real ones).
    The CPU allocator's own peak (torch.profiler's allocation events, below any dispatch) is at least the live
    tensors: it also counts what kernels allocate inside one operator (oneDNN's convolution scratch, as cuDNN's
    workspaces on a GPU), so a smaller figure means LiveBytes counts storages that do not exist. The weights and
    optimizer columns are the models' own parameter bytes: the weights alone are a fifth of the fast step's peak."""
    cfg = load_config("synthetic", ["data.crop_size=[48,48]"])
    result = check_on_cpu(cfg)
    student, teacher = build_student_teacher(cfg.model, torch.device("cpu"))
    weights = sum(t.numel() * t.element_size() for m in (student, teacher) for t in [*m.parameters(), *m.buffers()])
    momentum = sum(p.numel() * p.element_size() for p in student.parameters() if p.requires_grad)
    for name in TRAINERS:
        r = result[name]
        assert abs(r["live_tensors_mib"] - r["predicted_mib"]) <= 0.005 * r["predicted_mib"], (name, r)
        assert r["allocator_mib"] >= r["live_tensors_mib"], (name, r)
        by_cat = r["predicted_by_category_mib"]
        assert by_cat["weights"] * 2**20 == weights and by_cat["optimizer"] * 2**20 == momentum, (name, by_cat)
        assert by_cat["activations"] > by_cat["weights"]  # a training step's peak is its activations
    # the fused MMD never builds the upsampled features: the fast step's peak is well below the reference's
    assert result["fast"]["predicted_mib"] < 0.5 * result["reference"]["predicted_mib"]
