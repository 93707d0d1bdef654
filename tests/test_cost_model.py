"""The GPU cost model and the step profile's classes, on CPU: the cost model's counted matrix FLOPs agree with
bench.flops (an independent count: FlopCounterMode on real tensors), the fast step moves fewer bytes than the
reference, profiler event names land in the intended classes, and the step's DSP calls count as DSP ops whatever
operators they run (on CPU: the twins and the adjoint's plain-PyTorch operators)."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from bench.cost_model import run
from bench.flops import step_flops
from bench.profile_step import dsp_ranges, event_class, op_class
from dsp_fast import method


def test_cost_model_counts_the_step_flops_and_predicts_the_fast_step_cheaper():
    r = run("h200", "tiny", 64, 2, data_workers=4)
    counted = step_flops("tiny", 64, 2)["step"]  # B * (F + 3 FB), convolutions and matmuls of the model
    matrix = r["fast"]["per_class"]["convolution / matmul"]["gflop"] * 1e9
    # the cost model also counts the MMD's pooling matmuls (a few kFLOP at this size): equal within 1%
    assert matrix == pytest.approx(counted, rel=0.01)
    def gbytes(side: str, cls: str | None = None) -> float:
        per = r[side]["per_class"]
        return per[cls]["gbyte"] if cls else sum(c["gbyte"] for c in per.values())

    # bf16 halves the activations' bytes; at this tiny size autocast's weight casts weigh in, so only the totals
    # and the classes without casts are compared
    assert gbytes("fast") < gbytes("reference")
    for cls in ("convolution / matmul", "batch norm", "DSP ops"):
        assert gbytes("fast", cls) < gbytes("reference", cls), cls
    assert r["fast"]["step_ms"] > 0 and r["predicted_ratio"] > 1


@pytest.mark.parametrize("name,cls", [("aten::convolution_backward", "convolution"),
                                      ("aten::mkldnn_convolution", "convolution"),
                                      ("aten::native_batch_norm", "batch norm"), ("aten::bmm", "matmul"),
                                      ("aten::_foreach_mul_", "optimizer + EMA"),
                                      ("aten::_fused_sgd_", "optimizer + EMA"),
                                      ("dsp_fast::dual_soft_paste", "DSP ops"),
                                      ("aten::add_", "elementwise / reduction"), ("step", None)])
def test_profile_classes(name, cls):
    assert op_class(name) == cls


def test_dsp_calls_count_as_dsp_ops_and_the_rest_keeps_its_class(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")  # the CPU user's path: the adjoint's plain-PyTorch operators
    gen = torch.Generator().manual_seed(0)
    feat_s, feat_t = torch.randn(2, 8, 5, 5, generator=gen), torch.randn(2, 8, 5, 5, generator=gen)
    mask = torch.rand(2, 33, 33, generator=gen) > 0.5
    with profile(activities=[ProfilerActivity.CPU]) as prof, dsp_ranges():
        method.weighted_mmd(feat_s, feat_t, mask, (33, 33))
        torch.mm(feat_s.flatten(1), feat_t.flatten(1).T)  # outside the DSP call: a matmul
    classes = [(e.name, event_class(e)) for e in prof.events() if e.name.startswith("aten::")]
    assert ("aten::mm", "matmul") in classes
    inside = [name for name, cls in classes if cls == "DSP ops"]
    assert "aten::exp" in inside and ("aten::bmm" in inside or "aten::matmul" in inside), inside
    assert method.weighted_mmd.__name__ == "weighted_mmd" and not hasattr(method.weighted_mmd, "__wrapped__")
