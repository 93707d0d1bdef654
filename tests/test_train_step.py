"""The fast trainer's step (`dsp_fast.engine.step.train_step`) against the reference step, its skip of non-finite
steps, its device-side random choices, and (on a GPU only) CUDA-graph replay against eager.

Tolerances: fp32 NCHW, the fast step differs from the reference only in summation order (fused kernels, fused
SGD), as in test_method_equivalence: 1e-5 relative on the losses, 1e-6 absolute on the weights after one step at
lr 1e-2. channels_last changes the convolution kernels' accumulation order too: 1e-4 relative on the losses,
1e-5 absolute on the weights (measured on CPU, torch 2.13: NCHW 0 and 3e-8; channels_last 2e-7 and 5e-7).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers_step import (
    CPU,
    H,
    K,
    W,
    assert_fast_step_matches_reference,
    buffers,
    fast_context,
    make_batch,
    make_cfg,
    make_choices,
    to_device_choices,
    with_repeats,
)

from dsp_fast.augment import AUG_COLS
from dsp_fast.config import DSPConfig, FastConfig
from dsp_fast.engine.batchnorm import apply_group_bn
from dsp_fast.engine.model_setup import apply_channels_last, build_models, make_normalize
from dsp_fast.engine.optimizer import build_grad_scaler, build_optimizer, scheduled_lr
from dsp_fast.engine.step import StepContext, read_stats, train_step
from dsp_fast.kernels import set_value_checks
from dsp_fast.method import DeviceChoices, draw_choices_
from dsp_fast.models import build_model, normalize_input


@pytest.mark.parametrize("dsp,channels_last,repeats", [({}, False, False), ({}, True, False),
                                                       ({"drop_target_soft_term": True}, False, False),
                                                       ({"enabled": False}, False, False), ({}, False, True)])
def test_fast_step_matches_reference_step(dsp, channels_last, repeats):
    cfg = with_repeats(make_cfg(**dsp), repeats)
    gen = torch.Generator().manual_seed(1)
    batch = make_batch(gen)
    choices = make_choices(cfg, batch[3], gen)
    assert_fast_step_matches_reference(cfg, batch, choices, to_device_choices(choices), channels_last)


def _snapshot(ctx: StepContext) -> list[torch.Tensor]:
    momentum = [ctx.optimizer.state[p]["momentum_buffer"] for g in ctx.optimizer.param_groups for p in g["params"]]
    return [t.detach().clone() for t in [*ctx.student_params, *ctx.teacher_params, *momentum]]


@pytest.mark.parametrize("optimizer,repeats", [("fused", False), ("foreach", False), ("fused", True)])
def test_non_finite_step_is_skipped_and_counted(optimizer, repeats):
    cfg = with_repeats(make_cfg(), repeats)
    gen = torch.Generator().manual_seed(2)
    batch = make_batch(gen)
    ch = to_device_choices(make_choices(cfg, batch[3], gen))
    student, teacher = build_models(cfg, CPU)
    ctx = fast_context(cfg, student, teacher, optimizer)
    ctx.set_schedule_(5, 1e-2)
    poisoned = buffers(batch, ch)
    poisoned.x_s[0, 0, 0, 0] = float("nan")  # a NaN pixel: NaN loss
    before = _snapshot(ctx)
    train_step(ctx, poisoned)
    # a finite loss with an infinite gradient is skipped too
    hook = ctx.student_params[0].register_hook(lambda g: g * float("inf"))
    train_step(ctx, buffers(batch, ch))
    hook.remove()
    for a, b in zip(before, _snapshot(ctx)):  # weights, teacher and momentum untouched, bit for bit
        assert torch.equal(a, b)
    assert ctx.counts.tolist() == [0.0, 2.0, 2.0]

    train_step(ctx, buffers(batch, ch))  # a good step updates and ends the run of skipped steps
    assert any(not torch.equal(a, b) for a, b in zip(before, _snapshot(ctx)))
    losses, skipped, consecutive = read_stats(ctx)
    assert skipped == 2 and consecutive == 0
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())  # means over the good step only


def test_device_choices_follow_the_reference_distributions():
    d = DSPConfig()
    n = 4000

    def choices(rows: int) -> DeviceChoices:
        return DeviceChoices(class_u=torch.zeros(rows, K), lt_img=torch.zeros(0, 3, H, W),
                             lt_label=torch.zeros(0, H, W), lt_cls=torch.zeros(0, dtype=torch.int64),
                             aug_src=torch.zeros(rows, AUG_COLS), aug_tgt=torch.zeros(rows, AUG_COLS))

    ch = choices(n)
    gen = torch.Generator().manual_seed(0)
    draw_choices_(ch, gen, d)
    s = d.jitter_strength
    for aug in (ch.aug_src, ch.aug_tgt):
        assert aug[:, 1].min() >= -s and aug[:, 1].max() <= s  # brightness: an offset
        assert aug[:, 2:4].min() >= 1 - s and aug[:, 2:4].max() <= 1 + s
        assert aug[:, 4].min() >= -s and aug[:, 4].max() <= s
        assert aug[:, 6].min() >= 0.15 and aug[:, 6].max() <= 1.15
        # the order keys give every one of the 24 permutations about equally often (n/24 = 167 expected each)
        perms = torch.unique(aug[:, 7:11].argsort(1), dim=0, return_counts=True)[1]
        assert len(perms) == 24 and perms.min() > 167 - 60 and perms.max() < 167 + 60
    assert 0 <= ch.class_u.min() and ch.class_u.max() < 1
    # one jitter coin and one blur coin per step, shared by every mixed image; p over 2000 steps (3 sigma ~ 0.03)
    coins = []
    small = choices(2)
    for _ in range(2000):
        draw_choices_(small, gen, d)
        both = torch.cat([small.aug_src, small.aug_tgt])
        assert (both[:, 0] == both[0, 0]).all() and (both[:, 5] == both[0, 5]).all()
        coins.append(both[0, [0, 5]])
    coins = torch.stack(coins)
    assert abs(coins[:, 0].mean() - d.jitter_p) < 0.03 and abs(coins[:, 1].mean() - d.blur_p) < 0.035
    first = ch.aug_src.clone()
    draw_choices_(ch, torch.Generator().manual_seed(0), d)
    assert torch.equal(first, ch.aug_src)  # the generator alone decides: a restored state replays the choices


@pytest.mark.parametrize("kind", ["torchvision", "deeplab"])
def test_normalize_constants_give_the_same_bits(kind):
    x = torch.rand(2, 3, 5, 7)
    assert torch.equal(make_normalize(kind, CPU)(x), normalize_input(x, kind))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_step_matches_eager_step():
    """Same init, same batches, same choice generator: the captured and replayed step must give the eager step's
    losses and weights. Tolerance: CUDA's bilinear-upsample backward accumulates with
    atomics, so two eager runs already differ in the last bits and the differences grow over the steps; the graphed
    run may differ from eager by at most 4x the largest eager-vs-eager difference, plus 1e-6 (fp32 rounding)."""
    from dsp_fast.engine.graphs import GraphedStep

    cfg = make_cfg()
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = False
    gen = torch.Generator().manual_seed(3)
    batches = [[t.to(dev) for t in make_batch(gen)] for _ in range(6)]
    ch = to_device_choices(make_choices(cfg, batches[0][3].cpu(), gen))
    set_value_checks(False)  # as the CUDA path runs: no label check, no host sync in the step
    results = []
    for graphed in (False, False, True):
        torch.manual_seed(0)
        student = build_model(cfg.model).to(dev)
        teacher = copy.deepcopy(student).requires_grad_(False)
        opts = FastConfig(amp="fp32", channels_last=True, optimizer="fused")
        apply_channels_last(student, teacher)
        apply_group_bn(student, cfg.data.batch_size)
        opt, device_skip = build_optimizer(cfg, student, opts, dev)
        ctx = StepContext(cfg, student, teacher, opt, make_normalize("torchvision", dev),
                          torch.float32, build_grad_scaler(torch.float32, dev), device_skip,
                          sync_flag=False, autocast_cache=not graphed)
        buf = buffers(batches[0], DeviceChoices(*(t.to(dev) for t in vars(ch).values())), channels_last=True)
        choice_gen = torch.Generator(device=dev).manual_seed(7)
        runner = GraphedStep(lambda: train_step(ctx, buf), warmup=2) if graphed else (lambda: train_step(ctx, buf))
        losses = []
        for step, batch in enumerate(batches):
            for dst, src in zip((buf.x_s, buf.y_s, buf.x_m, buf.y_m, buf.x_t), batch):
                dst.copy_(src)
            draw_choices_(buf.choices, choice_gen, cfg.dsp)
            ctx.set_schedule_(step, scheduled_lr(cfg.optim, step, cfg.train.max_steps))
            runner()
            losses.append(read_stats(ctx)[0])
        if graphed:
            assert runner.graph is not None, "the step was not captured"
        results.append((losses, [p.detach().clone() for p in [*student.parameters(), *teacher.parameters()]]))
    set_value_checks(True)
    (eager_losses, eager_w), (again_losses, again_w), (graph_losses, graph_w) = results

    def loss_gap(a_steps, b_steps) -> float:
        return max(abs(a[k] - b[k]) for a, b in zip(a_steps, b_steps) for k in a)

    def weight_gap(a_list, b_list) -> float:
        return max(float((a - b).abs().max()) for a, b in zip(a_list, b_list))

    assert loss_gap(eager_losses, graph_losses) <= 4 * loss_gap(eager_losses, again_losses) + 1e-6
    assert weight_gap(eager_w, graph_w) <= 4 * weight_gap(eager_w, again_w) + 1e-6
