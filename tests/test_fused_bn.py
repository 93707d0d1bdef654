"""fast.fused_bn: the DeepLabv2 bottlenecks and stem with fused BN -> ReLU (-> + identity) chains. The whole fast
step with the fused modules equals the step with the unfused ones (losses, gradients, parameters and BN buffers
after two updates), through the Triton kernels (under the interpreter) and through their twin; the conversion keeps
every parameter, buffer and key; the trainer's setup falls back to the unfused layers with one line naming why.

Tolerances: the twin runs the same F.batch_norm calls per group as the per-group layers and F.relu instead of the
in-place ReLU: bit for bit, compared at 0. The kernels sum the statistics in another order (~1e-7 relative per BN
layer). Losses, parameters and BN buffers after two updates and the EMA stay within 1e-5 relative (of each
tensor's largest value; measured: below 1e-6). Gradients: 3e-4 of each tensor's largest value (measured: up to
1.1e-4, in layer1). The backward of a BN layer subtracts two means from dy', which cancels most of it on these
tiny maps, so ~1e-7 differences grow through 13 layers: the unfused step itself, channels_last against NCHW (the
convolutions' sums reordered), differs by up to 9.7e-5 of the largest gradient (measured, torch 2.13 CPU).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers_capture import OpRecorder
from helpers_step import CPU, buffers, fast_context, make_batch, make_cfg, make_choices, to_device_choices

from dsp_fast import kernels
from dsp_fast.engine import fused_bn, model_setup
from dsp_fast.engine.distributed import DistInfo
from dsp_fast.engine.fused_bn import FusedBottleneck, FusedDeepLabV2, convert_fused_bn, fused_bn_unavailable
from dsp_fast.engine.model_setup import apply_fused_bn, build_models
from dsp_fast.engine.step import compute_losses, train_step
from dsp_fast.models.deeplabv2 import Bottleneck

BN_OPS = {"dsp_fast::bn_stats", "dsp_fast::bn_act_fwd", "dsp_fast::bn_act_bwd_reduce", "dsp_fast::bn_act_bwd_dx"}


def _two_steps(cfg, student, teacher, batch, choices, fused: bool, channels_last: bool) -> tuple:
    """Two train_steps, then the losses and gradients of a third; returns them, both models' state and the ops."""
    student, teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    if fused:
        assert convert_fused_bn(student) == convert_fused_bn(teacher) == 5  # the stem and 4 bottlenecks of tiny
    ctx = fast_context(cfg, student, teacher, channels_last=channels_last)
    with OpRecorder() as rec:
        for _ in range(2):
            train_step(ctx, buffers(batch, choices, channels_last))
        ctx.optimizer.zero_grad(set_to_none=True)
        losses = compute_losses(ctx, buffers(batch, choices, channels_last))
        losses["loss"].backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return ({k: float(v.detach()) for k, v in losses.items()}, grads, student.state_dict(), teacher.state_dict(),
            {op for op, _ in rec.ops})


@pytest.mark.parametrize("twins,channels_last", [(False, True), (True, False)])
def test_fused_step_equals_unfused_step(twins, channels_last):
    cfg = make_cfg()
    gen = torch.Generator().manual_seed(4)
    batch = make_batch(gen)
    choices = to_device_choices(make_choices(cfg, batch[3], gen))
    student, teacher = build_models(cfg, CPU)
    with kernels.force_twins(twins):
        plain = _two_steps(cfg, student, teacher, batch, choices, False, channels_last)
        fused = _two_steps(cfg, student, teacher, batch, choices, True, channels_last)
    assert not (BN_OPS & plain[4])
    assert (BN_OPS <= fused[4]) != twins  # the kernels' operators ran, or the twin did
    rel = 0.0 if twins else 1e-5
    for k in plain[0]:
        assert fused[0][k] == pytest.approx(plain[0][k], rel=rel, abs=rel * 1e-2), k
    assert list(plain[1]) == list(fused[1]) and len(plain[1]) > 10
    for want, got, tol in ((plain[1], fused[1], 30 * rel), (plain[2], fused[2], rel), (plain[3], fused[3], rel)):
        assert list(want) == list(got)
        for n in want:
            atol = tol * float(want[n].abs().max()) if want[n].is_floating_point() else 0
            torch.testing.assert_close(got[n], want[n], rtol=0, atol=atol, msg=n)


def test_conversion_keeps_parameters_buffers_and_keys():
    student, _ = build_models(make_cfg(), CPU)
    before = {k: v for k, v in student.state_dict(keep_vars=True).items()}
    convert_fused_bn(student)
    after = student.state_dict(keep_vars=True)
    assert list(before) == list(after) and all(before[k] is after[k] for k in before)
    assert type(student) is FusedDeepLabV2
    assert {type(m) for m in student.modules() if isinstance(m, Bottleneck)} == {FusedBottleneck}


def test_a_block_with_an_unfusable_bn_keeps_its_forward():
    """momentum None (a cumulative average read on the host) is left to the unfused layer, block by block."""
    student, _ = build_models(make_cfg(), CPU)
    student.layer2[0].bn2.momentum = None
    convert_fused_bn(student)
    assert type(student.layer2[0]) is Bottleneck and type(student.layer3[0]) is FusedBottleneck


def _apply(mode: str, info: DistInfo) -> tuple[bool, list[str], torch.nn.Module]:
    said: list[str] = []
    student, _ = build_models(make_cfg(), CPU)
    return apply_fused_bn(mode, info, said.append, student), said, student


def test_modes_and_the_fallbacks(monkeypatch):
    on, said, student = _apply("auto", DistInfo())  # auto: CUDA only
    assert not on and not said and type(student) is not FusedDeepLabV2
    on, said, student = _apply("always", DistInfo())  # a CPU tensor runs the twin
    assert on and not said and type(student) is FusedDeepLabV2
    on, said, student = _apply("always", DistInfo(world_size=2))
    assert not on and type(student) is not FusedDeepLabV2
    assert said == ["fast.fused_bn: off with 2 ranks (the fused kernels take one rank's batch statistics; BN over "
                    "ranks runs unfused)"]
    monkeypatch.setattr(model_setup, "fused_bn_unavailable", lambda device: "triton is not installed (the gpu extra)")
    on, said, student = _apply("always", DistInfo())
    assert not on and type(student) is not FusedDeepLabV2
    assert said == ["fast.fused_bn: off, triton is not installed (the gpu extra)"]


def test_unavailable_names_the_cause(monkeypatch):
    """Kernels that fail at their first use on a CUDA device (here, without a GPU: the CPU build's own error) and a
    missing Triton each give one line naming the cause; a CPU device needs nothing; a GPU passes the probe."""
    assert fused_bn_unavailable(CPU) == ""
    cuda = torch.device("cuda")
    if torch.cuda.is_available():
        assert fused_bn_unavailable(cuda) == ""
    else:
        reason = fused_bn_unavailable(cuda)
        assert reason.startswith("the fused kernels failed at their first use: ") and "CUDA" in reason
        assert "\n" not in reason
    monkeypatch.setattr(fused_bn.kernels, "HAS_TRITON", False)
    assert fused_bn_unavailable(cuda) == "triton is not installed (the gpu extra)"
