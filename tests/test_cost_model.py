"""The GPU cost model and the step profile's classes, on CPU: the cost model's counted matrix FLOPs agree with
bench.flops (an independent count: FlopCounterMode on real tensors), the fast step moves fewer bytes than the
reference, the plan's transforms (the fused batch-norm chain, the batched student, the casts once) move the bytes
and launches they claim, the CPU rates are measured, profiler event names land in the intended classes, and the
step's DSP calls count as DSP ops whatever operators they run (on CPU: the twins and the adjoint's plain-PyTorch
operators)."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from bench.cost_cpu import measure_cpu
from bench.cost_model import Counter, predict, run
from bench.cost_plan import fuse_bn_chains
from bench.cost_step import record_step
from bench.flops import step_flops
from bench.profile_step import dsp_ranges, event_class, op_class
from dsp_fast import method
from dsp_fast.config import ModelConfig
from dsp_fast.models import build_model


def test_cost_model_counts_the_step_flops_and_predicts_the_fast_step_cheaper():
    r = run("h200", "tiny", 64, 2, data_workers=4)
    counted = step_flops("tiny", 64, 2)["step"]  # B * (F + 3 FB), convolutions and matmuls of the model
    matrix = sum(r["fast"]["per_class"][c]["gflop"] for c in ("convolution", "matmul")) * 1e9
    # the cost model also counts the MMD's pooling matmuls (a few kFLOP at this size): equal within 1%
    assert matrix == pytest.approx(counted, rel=0.01)
    def gbytes(side: str, cls: str | None = None) -> float:
        per = r[side]["per_class"]
        return per[cls]["gbyte"] if cls else sum(c["gbyte"] for c in per.values())

    # bf16 halves the activations' bytes; at this tiny size autocast's weight casts weigh in, so only the totals
    # and the classes without casts are compared
    assert gbytes("fast") < gbytes("reference")
    for cls in ("convolution", "batch norm", "DSP ops"):
        assert gbytes("fast", cls) < gbytes("reference", cls), cls
    assert r["fast"]["step_ms"] > 0 and r["predicted_ratio"] > 1


def test_fused_batch_norm_chain_reads_and_writes_each_tensor_once():
    """bn -> + identity -> relu_ forward: unfused, BN writes y, the add reads y and identity and writes s, relu_
    reads and writes s; fused, one pass reads x and identity and writes the output (exact byte counts, fp32)."""
    n = 2 * 8 * 16 * 16 * 4  # bytes of one activation
    with torch.device("meta"):
        bn = torch.nn.BatchNorm2d(8).requires_grad_(False)
        x, identity = torch.empty(2, 8, 16, 16), torch.empty(2, 8, 16, 16)
    counter = Counter()
    with counter:
        torch.relu_(bn(x) + identity)
    unfused = sum(op.bytes for op in counter.ops)
    (fused,) = [op for op in fuse_bn_chains(counter.ops) if op.name.startswith("fused:")]
    params = 6 * 8 * 4 + 8  # weight, bias, running stats in, saved mean / invstd out; num_batches_tracked
    assert fused.bytes == pytest.approx(3 * n, abs=params + 64)
    assert unfused - sum(op.bytes for op in fuse_bn_chains(counter.ops)) == pytest.approx(4 * n, abs=params + 64)


def test_batched_student_and_casts_once_keep_the_work_and_cut_launches_and_casts():
    per_step, _ = record_step("tiny", 64, 2, fast=True)
    batched, _ = record_step("tiny", 64, 2, fast=True, batched=True)
    once, _ = record_step("tiny", 64, 2, fast=True, cast_once=True)

    def total(ops, what):
        return sum(getattr(op, what) for op in ops if op.cls == "convolution")

    # the same convolutions, on 3B images at once: equal FLOPs (float sums: 1e-9), a third of the launches + 1 pass
    assert total(batched, "flops") == pytest.approx(total(per_step, "flops"), rel=1e-9)
    assert len([op for op in batched if op.cls == "convolution"]) < 0.6 * len(
        [op for op in per_step if op.cls == "convolution"])
    # autocast casts every convolution weight at each of the 4 forwards and the 3 student gradients back; once per
    # step: 2 forward casts (student, teacher) and 1 back, so 4 casts fewer per convolution weight and bias
    with torch.device("meta"):
        model = build_model(ModelConfig(arch="tiny", num_classes=19))
    bn = {n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    weights = sum(n.rpartition(".")[0] not in bn for n, _ in model.named_parameters())
    casts = [sum(op.name == "_to_copy" for op in ops) for ops in (per_step, once)]
    assert casts[0] - casts[1] == 4 * weights


def test_cpu_rates_are_measured_and_predict_a_positive_step():
    rates = measure_cpu()
    assert rates["fp32_flops"] > 1e8 and rates["bytes_per_s"] > 1e8 and 0 < rates["op_s"] < 1e-3
    ops, _ = record_step("tiny", 64, 2, fast=True, cpu=True)
    assert any(op.name == "_log_softmax" and op.launches == 2 for op in ops)  # the layout copy inside
    assert predict(ops, rates["fp32_flops"], rates["bytes_per_s"], rates["op_s"])["compute_ms"] > 0


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
