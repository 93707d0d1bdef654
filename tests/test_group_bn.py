"""The student's three forwards as one call (fast.batched_student): a BN layer with statistics per group of images
equals separate calls (outputs, input and affine gradients, running statistics), and the whole DSP step with one
batched student call equals the step with three calls (losses, every gradient, BN buffers), on DeepLab (`tiny`)
and on MiT + DAFormer (whose decoder has BN). Two gloo ranks with per-group statistics over ranks:
tests/test_scaling.py, which runs the batched step (the default) against one process.

Tolerances: the per-group layer runs the same BN kernel on the same images as separate calls, so its outputs and
running statistics are compared bit for bit; the affine gradients are summed over the groups by autograd in
another order (1e-6 relative). In the whole step the convolutions run over 3B images instead of B, whose kernels
may accumulate in another order: losses 1e-5 relative, gradients 1e-5 of each tensor's largest (fp32; measured on
CPU, torch 2.13, well below).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from helpers_step import (
    CPU,
    SCRIPT_DSP,
    buffers,
    fast_context,
    make_batch,
    make_cfg,
    make_choices,
    mit_batch,
    mit_cfg,
    mit_choices,
    to_device_choices,
)
from torch import nn

from dsp_fast.config import FastConfig
from dsp_fast.engine.batchnorm import (
    GlobalBatchNorm2d,
    PerGroupBatchNorm2d,
    PerGroupStats,
    apply_group_bn,
    convert_global_bn,
)
from dsp_fast.engine.model_setup import build_models
from dsp_fast.engine.step import StepContext, compute_losses


def _bn_pair(channels: int, dtype: torch.dtype) -> tuple[nn.BatchNorm2d, nn.BatchNorm2d]:
    bn = nn.BatchNorm2d(channels).to(dtype)
    with torch.no_grad():  # not the initial 1 / 0, so that a wrong affine map shows
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
    return bn, apply_group_bn(copy.deepcopy(bn), 0)


@pytest.mark.parametrize("groups,n,c,h,w", [(3, 2, 5, 17, 33), (3, 1, 3, 1, 1 + 1), (2, 3, 4, 5, 7)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_per_group_bn_equals_separate_calls(groups, n, c, h, w, channels_last, dtype):
    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(groups * n, c, h, w, generator=gen) * 3 + 1).to(dtype).contiguous(memory_format=fmt)
    g = torch.randn(x.shape, generator=gen).to(dtype)
    separate, grouped = _bn_pair(c, dtype)
    grouped.group_size = n
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = torch.cat([separate(part) for part in xa.split(n)])
    yb = grouped(xb)
    assert isinstance(grouped, PerGroupBatchNorm2d) and yb.shape == ya.shape
    assert torch.equal(yb, ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    assert torch.equal(xb.grad, xa.grad)
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    for pa, pb in ((separate.weight, grouped.weight), (separate.bias, grouped.bias)):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=tol, atol=tol)
    # the running statistics moved once per group, in order
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(grouped, name), getattr(separate, name)), name
    assert int(grouped.num_batches_tracked) == groups


def test_per_group_bn_passes_through_eval_and_small_calls():
    bn, grouped = _bn_pair(4, torch.float32)
    grouped.group_size = 2
    x = torch.randn(6, 4, 3, 5)
    whole = bn(x)  # one call over 6: a small call (<= 2 images) of the grouped layer is such a plain call
    assert torch.equal(grouped(x[:2]), bn(x[:2])) and not torch.equal(grouped(x), whole)
    grouped.load_state_dict(bn.state_dict())  # the calls above moved their running statistics apart
    bn.eval()
    grouped.eval()
    assert torch.equal(grouped(x), bn(x))  # eval mode: running statistics, a per-image map, no split needed
    grouped.train()
    with pytest.raises(ValueError, match="5 images does not split into groups of 2"):
        grouped(x[:5])


@pytest.mark.parametrize("cls", [nn.BatchNorm2d, GlobalBatchNorm2d, nn.SyncBatchNorm])
def test_each_bn_class_gets_its_per_group_version(cls):
    """The classes the trainer's BN layers can have (GlobalBatchNorm2d with several CPU ranks, SyncBatchNorm with
    several GPUs): each per-group version equals separate calls of the class itself (one process here, where both
    rank-aware classes compute plain batch statistics; their reduction over ranks per group: test_scaling.py)."""
    bn = cls(4)
    grouped = apply_group_bn(nn.Sequential(copy.deepcopy(bn)), 2)[0]
    assert isinstance(grouped, cls) and isinstance(grouped, PerGroupStats)
    x = torch.randn(6, 4, 5, 7)
    assert torch.equal(grouped(x), torch.cat([bn(part) for part in x.split(2)]))
    assert torch.equal(grouped.running_var, bn.running_var)


def test_apply_group_bn_keeps_tensors_and_keys():
    cfg = make_cfg()
    student, _ = build_models(cfg, CPU)
    convert_global_bn(student)  # on CPU: GlobalBatchNorm2d (a rank-aware BN), as the trainer's DDP path
    params = {k: v for k, v in student.state_dict(keep_vars=True).items()}
    apply_group_bn(student, 2)
    after = student.state_dict(keep_vars=True)
    assert list(after) == list(params) and all(after[k] is v for k, v in params.items())
    bns = [m for m in student.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(isinstance(m, PerGroupStats) and isinstance(m, GlobalBatchNorm2d) and m.group_size == 2
                       for m in bns)
    with pytest.raises(TypeError, match="BatchNorm1d has no per-group version"):
        apply_group_bn(nn.Sequential(nn.BatchNorm1d(3)), 2)


def test_batched_student_refused_without_per_group_bn():
    cfg = make_cfg()
    student, teacher = build_models(cfg, CPU)
    ctx = fast_context(dataclasses.replace(cfg, fast=FastConfig(batched_student=False)), student, teacher)
    with pytest.raises(ValueError, match="BN layers take statistics over the whole call"):
        StepContext(dataclasses.replace(cfg, fast=FastConfig(batched_student=True)), student, teacher, ctx.optimizer,
                    ctx.normalize, ctx.amp_dtype, ctx.scaler,
                    ctx.device_skip, sync_flag=False)


def _losses_and_grads(cfg, student, teacher, batch, choices, batched: bool, channels_last: bool = False):
    """compute_losses + backward with the student's forwards batched or not; returns the losses, the gradients, the
    student's state (BN running statistics included) and how many times the student was called."""
    cfg = dataclasses.replace(cfg, fast=FastConfig(batched_student=batched))
    student, teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    ctx = fast_context(cfg, student, teacher, channels_last=channels_last)
    calls = []
    student.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    losses = compute_losses(ctx, buffers(batch, choices, channels_last))
    losses["loss"].backward()
    grads = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    return {k: float(v.detach()) for k, v in losses.items()}, grads, student.state_dict(), calls


def _assert_same(a, b) -> None:
    (la, ga, sa, _), (lb, gb, sb, _) = a, b
    for k in la:
        assert lb[k] == pytest.approx(la[k], rel=1e-5, abs=1e-7), k
    assert list(ga) == list(gb) and len(ga) > 10
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=0, atol=1e-5 * float(ga[n].abs().max()) + 1e-12, msg=n)
    for n in sa:  # BN running statistics (and the step counters) as three calls leave them
        torch.testing.assert_close(sb[n], sa[n], rtol=0, atol=1e-6, msg=n)


@pytest.mark.parametrize("dsp,channels_last", [({}, False), ({}, True), (SCRIPT_DSP, False)])
def test_batched_step_equals_three_calls(dsp, channels_last):
    cfg = make_cfg(**dsp)
    gen = torch.Generator().manual_seed(4)
    batch = make_batch(gen)
    choices = to_device_choices(make_choices(cfg, batch[3], gen))
    student, teacher = build_models(cfg, CPU)
    three = _losses_and_grads(cfg, student, teacher, batch, choices, batched=False, channels_last=channels_last)
    one = _losses_and_grads(cfg, student, teacher, batch, choices, batched=True, channels_last=channels_last)
    b = cfg.data.batch_size
    assert three[3] == [b, b, b] and one[3] == [3 * b]  # the student really ran once over the three batches
    _assert_same(three, one)
    # not vacuous: one call over 3B with whole-call BN statistics gives other losses
    cfg_wrong = dataclasses.replace(cfg, fast=FastConfig(batched_student=True))
    s, t = copy.deepcopy(student), copy.deepcopy(teacher)
    ctx = fast_context(cfg_wrong, s, t, group_size=3 * b)  # one group: whole-call statistics
    wrong = compute_losses(ctx, buffers(batch, choices))
    assert abs(float(wrong["loss"].detach()) - one[0]["loss"]) > 1e-4


def test_batched_step_equals_three_calls_on_mit_b0():
    """MiT's LayerNorms are per token; the DAFormer decoder's BN is per group. Drop path off: with it on, the one call
    draws every image's decisions at once (the same distribution, other draws than three calls)."""
    cfg = mit_cfg("sgd")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, drop_path_rate=0.0))
    gen = torch.Generator().manual_seed(4)
    batch = mit_batch(gen)
    choices = to_device_choices(mit_choices(batch[3], gen))
    student, teacher = build_models(cfg, CPU)
    student.set_stochastic(False)  # no dropout either
    _assert_same(_losses_and_grads(cfg, student, teacher, batch, choices, batched=False),
                 _losses_and_grads(cfg, student, teacher, batch, choices, batched=True))
