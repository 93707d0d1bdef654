"""fast.compile on CPU: the step with torch.compile (inductor) of the models ('model') or of steps 1-6 ('step')
gives the eager step's losses and weights. Tolerance: inductor fuses and reorders float32 arithmetic (and its CPU
convolutions may pick other kernels): 1e-4 relative on the losses, 1e-5 absolute on the weights after one step at
lr 1e-2 (the eager-vs-reference tolerances of test_train_step, widened 10x for reordering). The step runs as a CPU
user's does (the kernels' twins, not the interpreter) and, with the settings the runner uses under compile (no
label-value checks), the compiled region has no graph break."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers_step import buffers, fast_context, make_batch, make_cfg, make_choices, to_device_choices

from dsp_fast.config import FastConfig
from dsp_fast.engine.model_setup import apply_compile, build_models
from dsp_fast.engine.optimizer import scheduled_lr
from dsp_fast.engine.step import read_stats, train_step
from dsp_fast.engine.trainer import value_checks_wanted
from dsp_fast.kernels import set_value_checks


@pytest.mark.parametrize("mode", ["model", "step"])
def test_compiled_step_matches_eager(mode, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")  # CPU tensors then go to the twins, as outside the tests
    torch._dynamo.reset()
    cfg = make_cfg()
    gen = torch.Generator().manual_seed(1)
    batch = make_batch(gen)
    ch = to_device_choices(make_choices(cfg, batch[3], gen))
    student, teacher = build_models(cfg, torch.device("cpu"))
    results = []
    for compiled in (False, True):
        s, t = copy.deepcopy(student), copy.deepcopy(teacher)
        ctx = fast_context(cfg, s, t)
        if compiled:
            ctx.compiled_losses = apply_compile(mode, s, t)
        ctx.set_schedule_(3, scheduled_lr(cfg.optim, 3, cfg.train.max_steps))
        torch._dynamo.utils.counters.clear()
        set_value_checks(value_checks_wanted(FastConfig(compile=mode if compiled else "off"), torch.device("cpu")))
        try:
            train_step(ctx, buffers(batch, ch))
        finally:
            set_value_checks(True)
        assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
        losses, skipped, _ = read_stats(ctx)
        assert skipped == 0
        results.append((losses, [p.detach().clone() for p in [*s.parameters(), *t.parameters()]]))
    (eager, eager_w), (comp, comp_w) = results
    assert set(eager) == set(comp)
    for k in eager:
        assert comp[k] == pytest.approx(eager[k], rel=1e-4, abs=1e-7), k
    for a, b in zip(eager_w, comp_w):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
