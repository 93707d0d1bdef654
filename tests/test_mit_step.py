"""The fast trainer's step on `mit_b0` (SegFormer encoder + DAFormer decoder) against the reference step, with
SGD and with DAFormer's AdamW (head x10, no decay on norms, linear warm-up then poly), and the lr schedule.

Same weights, same batch, same random choices, and the same global seed before each step (drop path and dropout
draw from it in the same order on both paths: student on the source, teacher, student on the two mixed batches).
Tolerances: fp32 NCHW; the paths differ only in summation order (fused kernels, fused optimizer), as in
test_train_step: 1e-5 relative on the losses, 1e-5 of each tensor's largest gradient on the gradients, 1e-6
absolute on the weights after one step. AdamW divides each gradient by its own magnitude, so where a gradient is
itself at rounding level (terms that cancel) the two paths may move that weight differently: there the bound adds
AdamW's own sensitivity, lr * |gradient difference| / eps (fewer than 0.1% of the weights; measured on CPU).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from helpers_step import (
    CPU,
    assert_same_losses,
    buffers,
    fast_context,
    mit_batch,
    mit_cfg,
    mit_choices,
    to_device_choices,
)

from dsp_fast import reference
from dsp_fast.config import Config, FastConfig, OptimConfig, TrainConfig
from dsp_fast.engine.model_setup import build_models
from dsp_fast.engine.optimizer import scheduled_lr
from dsp_fast.engine.step import read_stats, train_step


@pytest.mark.parametrize("algorithm,dsp,channels_last", [
    ("sgd", {}, False), ("adamw", {}, False), ("adamw", {"enabled": False}, True),
    ("adamw", {"source_ce_mean": "all"}, False)])
def test_fast_step_matches_reference_step_on_mit_b0(algorithm, dsp, channels_last):
    # three student calls, as the reference: the one batched call draws every image's drop-path decisions at once
    # (the same distribution, other draws); tests/test_group_bn.py checks the batched call with drop path off
    cfg = dataclasses.replace(mit_cfg(algorithm, **dsp), fast=FastConfig(batched_student=False))
    gen = torch.Generator().manual_seed(1)
    batch = mit_batch(gen)
    choices = mit_choices(batch[3], gen)
    student, teacher = build_models(cfg, CPU)
    fast_student, fast_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    before = copy.deepcopy(student.state_dict())
    step = 3  # inside the warm-up for AdamW: both schedules must agree there

    ref_opt = reference.build_optimizer(cfg, student)
    torch.manual_seed(11)
    ref_losses = reference.train_step(cfg, student, teacher, ref_opt, step, batch, choices)

    ctx = fast_context(cfg, fast_student, fast_teacher, channels_last=channels_last)
    assert type(ctx.optimizer) is type(ref_opt) and ctx.device_skip  # fused SGD / AdamW, found_inf on the device
    ctx.set_schedule_(step, scheduled_lr(cfg.optim, step, cfg.train.max_steps))
    torch.manual_seed(11)
    train_step(ctx, buffers(batch, to_device_choices(choices), channels_last))
    losses, skipped, _ = read_stats(ctx)

    rel, atol = assert_same_losses(losses, skipped, ref_losses, channels_last)
    pairs = [(n, p.grad, q.grad) for (n, p), q in zip(student.named_parameters(), fast_student.parameters())]
    assert all((g is None) == (h is None) for _, g, h in pairs)  # source-only never uses the MMD projection
    grads = [(n, g, h) for n, g, h in pairs if g is not None]
    # the queries matter (with a single key per attention, as at 32x32, their gradients are rounding noise ~1e-12)
    assert min(float(g.abs().max()) for n, g, _ in grads if ".attn.q." in n) > 1e-8
    for name, g, h in grads:  # the same gradients, up to summation order (relative to the tensor's largest)
        torch.testing.assert_close(h, g, rtol=0, atol=10 * rel * float(g.abs().max()) + 1e-12, msg=name)
    bound = {name: torch.full_like(g, atol) for name, g, _ in grads}
    if algorithm == "adamw":
        # AdamW's first step moves w by f(g) = lr * g / (|g| + eps), f' = lr * eps / (|g| + eps)^2: between the two
        # gradients g and h, f changes by at most lr * eps * |h - g| / (min |x| + eps)^2 over x in [g, h]
        eps = 1e-8
        lr_of = {id(p): grp["lr"] for grp in ref_opt.param_groups for p in grp["params"]}
        for (name, p), (_, g, h) in zip(student.named_parameters(), grads):
            lo = torch.where(g * h > 0, torch.minimum(g.abs(), h.abs()), 0.0)
            bound[name] = bound[name] + lr_of[id(p)] * eps * (h - g).abs() / (lo + eps) ** 2
        loose = sum(int((b > 10 * atol).sum()) for b in bound.values())
        assert loose < 1e-3 * sum(b.numel() for b in bound.values())  # nearly every weight is held to atol
    moved = 0
    for (name, a), b in zip(student.state_dict().items(), fast_student.state_dict().values()):
        if name in bound or name.startswith("c1."):
            worst = float(((b - a).abs() - bound.get(name, atol)).max())
            assert worst <= 0, f"{name}: off by {worst} beyond the bound"
        else:  # BN running statistics
            torch.testing.assert_close(b, a, rtol=0, atol=atol, msg=name)
        moved += not torch.equal(a, before[name])
    assert moved > 100  # the step did update the weights (not a vacuous comparison)
    # the teacher moves by (1 - alpha) times the student's difference: the student's bound holds for it too
    for (name, a), b in zip(teacher.named_parameters(), fast_teacher.parameters()):
        assert float(((b - a).abs() - bound.get(name, atol)).max()) <= 0, name


def test_adamw_skips_a_non_finite_step_without_a_trace():
    cfg = mit_cfg("adamw")
    gen = torch.Generator().manual_seed(2)
    batch = mit_batch(gen)
    ch = to_device_choices(mit_choices(batch[3], gen))
    student, teacher = build_models(cfg, CPU)
    ctx = fast_context(cfg, student, teacher)
    ctx.set_schedule_(5, 1e-3)
    train_step(ctx, buffers(batch, ch))  # one good step creates the AdamW state
    state = [t.clone() for p in ctx.student_params for t in ctx.optimizer.state[p].values()]
    weights = [p.detach().clone() for p in ctx.student_params]
    poisoned = buffers(batch, ch)
    poisoned.x_s[0, 0, 0, 0] = float("nan")
    train_step(ctx, poisoned)
    assert all(torch.equal(a, p) for a, p in zip(weights, ctx.student_params))
    # moments and the step counter (decremented back on the device) untouched
    assert all(torch.equal(a, b) for a, b in zip(state, [t for p in ctx.student_params
                                                          for t in ctx.optimizer.state[p].values()]))
    assert ctx.counts[:2].tolist() == [1.0, 1.0]


def test_schedule_daformer_known_values_and_reference_agree():
    o = OptimConfig(algorithm="adamw", lr=6e-5, poly_power=1.0, warmup_steps=1500, warmup_ratio=1e-6)
    cfg = Config(optim=o, train=TrainConfig(max_steps=40_000))
    # mmcv: poly lr * (1 - (1 - t/1500) * (1 - 1e-6)) during warm-up, plain poly after
    expect = {0: 6e-5 * 1e-6, 750: 6e-5 * (1 - 750 / 40_000) * (0.5 + 0.5e-6), 1500: 6e-5 * (1 - 1500 / 40_000),
              39_999: 6e-5 / 40_000}
    for step, lr in expect.items():
        assert scheduled_lr(o, step, 40_000) == pytest.approx(lr, rel=1e-12), step
        assert reference.poly_lr(cfg, step) == pytest.approx(lr, rel=1e-12), step
    # without warm-up both reduce to DSP's poly 0.9
    dsp = Config(train=TrainConfig(max_steps=100))
    assert scheduled_lr(dsp.optim, 10, 100) == reference.poly_lr(dsp, 10) == 2.5e-4 * 0.9 ** 0.9


def test_daformer_preset_loads():
    from dsp_fast.config import load_config

    cfg = load_config("gta2cs_mitb5")
    o = cfg.optim
    assert (cfg.model.arch, cfg.model.decoder_dim, cfg.data.crop_size, cfg.data.batch_size) == ("mit_b5", 256,
                                                                                                (512, 512), 2)
    assert (o.algorithm, o.lr, o.head_lr_mult, o.weight_decay, o.norm_decay_mult) == ("adamw", 6e-5, 10.0, 0.01, 0.0)
    assert (o.warmup_steps, o.warmup_ratio, o.poly_power, cfg.train.max_steps) == (1500, 1e-6, 1.0, 40_000)
    assert (cfg.dsp.ema_max, cfg.dsp.conf_threshold) == (0.999, 0.968)
    cpu = load_config("synthetic_mitb0")
    assert (cpu.model.arch, cpu.optim.algorithm, cpu.train.compare_source_only) == ("mit_b0", "adamw", True)


@pytest.mark.parametrize("override,field", [
    ("optim.algorithm=rmsprop", "optim.algorithm"), ("optim.betas=[0.9]", "optim.betas"),
    ("optim.warmup_steps=-1", "optim.warmup_steps"), ("optim.warmup_ratio=0", "optim.warmup_ratio"),
    ("model.arch=mit_b9", "model.arch"), ("model.pretrained_kind=deeplab", "model.pretrained_kind"),
    ("model.drop_path_rate=1.0", "model.drop_path_rate")])
def test_bad_mit_and_optim_fields_are_named(override, field):
    from dsp_fast.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, ["model.arch=mit_b0", override])
