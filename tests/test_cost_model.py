"""The GPU cost model and the step profile's classes, on CPU: the cost model's counted matrix FLOPs agree with
bench.flops (an independent count: FlopCounterMode on real tensors), the fast step moves fewer bytes than the
reference, and profiler event names land in the intended classes."""

from __future__ import annotations

import pytest

from bench.cost_model import run
from bench.flops import step_flops
from bench.profile_step import op_class


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
