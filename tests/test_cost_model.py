"""The cost model (`python -m bench.cost_model`) on a CPU: the FLOPs it records for each trainer's own step against
an independent count (torch.utils.flop_counter over the model alone, B x (F + 3 FB)), and its recording of the real
CPU step against torch.profiler's events of the same step, classed as bench.profile_step classes them."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from bench.cost_model import Counter, record_step
from bench.memory import cuda_like_trainer
from bench.profile_step import op_class
from bench.throughput.setup import step_flops
from dsp_fast.config import load_config


def test_recorded_step_flops_match_the_models_count():
    """Both trainers' steps run B forwards of the teacher and 3B of the student (4B F), the fast one 3B backwards of
    the student (3B (FB - F)): a recording that misses a pass or counts one twice is off by a sixth or more. (The
    reference's source pass leaves the MMD projection without a gradient, so its backward is a little smaller.) The
    blur's and the MMD's small convolutions and matmuls add a few MFLOP. The fast step, in bf16, moves fewer
    convolution and batch-norm bytes than the reference's fp32: the CUDA path's autocast is in the recording (with
    the unfused BN, whose class holds the BN alone: the fused operators carry the ReLU and the add too)."""
    cfg = load_config("synthetic", ["data.crop_size=[64,64]", "fast.fused_bn=never"])
    counted = step_flops(cfg, torch.device("meta"))
    b, f, fb = cfg.data.batch_size, counted["forward_per_image"], counted["forward_backward_per_image"]
    steps = {name: record_step(cfg, name) for name in ("fast", "reference")}

    def flops(name: str, op_name: str) -> float:
        return sum(op.flops for op in steps[name] if op.name == op_name)

    def gbytes(name: str, cls: str) -> float:
        return sum(op.bytes for op in steps[name] if op.cls == cls)

    for name in steps:
        assert flops(name, "convolution") == pytest.approx(4 * b * f, rel=0.01), name
    assert flops("fast", "convolution_backward") == pytest.approx(3 * b * (fb - f), rel=0.01)
    for cls in ("convolution", "batch norm"):
        assert gbytes("fast", cls) < 0.75 * gbytes("reference", cls), cls


def test_recording_sees_each_operator_the_profile_sees_once():
    """The real CPU step (the kernels in the Triton interpreter, as their `dsp_fast::` operators), recorded, then
    the next step profiled: each convolution, batch norm, matmul and fused kernel the recording prices is in the
    profile exactly as often (a missed backward, a kernel recorded as its parts or twice would show). Elementwise
    operators are left out: the profile also holds the ones that other operators run inside."""
    cfg = load_config("synthetic", ["data.crop_size=[32,32]"])
    counter = Counter()
    with cuda_like_trainer(cfg, fake=False, cuda_kernels=False) as run:
        run.step()
        with counter:
            run.step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run.step()
    events = collections.Counter(e.name for e in prof.events())
    recorded = collections.Counter(("dsp_fast::" if op.cls == "DSP ops" else "aten::") + op.name
                                   for op in counter.ops)
    assert recorded["dsp_fast::dual_soft_paste"] == 1
    assert recorded["aten::convolution"] > 0 and recorded["aten::convolution_backward"] > 0
    bad = {name: (n, events[name]) for name, n in recorded.items()
           if events[name] != n and op_class(name) in ("convolution", "batch norm", "matmul", "DSP ops")}
    assert not bad, bad
