"""Random kills of the fast trainer (CPU, the tiny model on the synthetic shift, 16 steps, a checkpoint every 2 steps
and an evaluation every 3): SIGKILL at seeded random moments of one run (during a step, right after the progress
line of a checkpoint step, once the write has begun, and of an evaluation step, which the evaluation follows), each
followed by `--resume auto`, ends bit for bit on the uninterrupted run's weights; so does SIGTERM, which stops at
the next step boundary with a checkpoint and exit code 143.

Each moment is chosen by waiting for a progress line, not by a sleep: on a loaded machine a kill may land a little
later than aimed (the step after, or past the write), which changes only what the resume repeats, never its end.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
from helpers_run import STEPS, STOPPED, TRAIN, Watched, assert_same_state, read, uninterrupted_checkpoint, watched_args

from dsp_fast.engine.checkpoint import checkpoint_name

CHECKPOINT_EVERY, EVAL_EVERY = 2, 3


@pytest.fixture
def reference(synthetic_root, tmp_path_factory) -> str:
    return uninterrupted_checkpoint(synthetic_root, tmp_path_factory)


def is_moment(kind: str, step: int | None, target: int) -> bool:
    """Whether the progress line of `step` is the moment to signal: the first step from `target` on after which
    the loop does `kind` (an evaluation, a checkpoint write with no evaluation before it, or just the next step)."""
    if step is None or step < target or step >= STEPS:
        return False
    evaluates, writes = step % EVAL_EVERY == 0, step % CHECKPOINT_EVERY == 0
    return {"eval": evaluates, "checkpoint": writes and not evaluates, "step": not (evaluates or writes)}[kind]


def await_write(folder: str, step: int, timeout_s: float = 5.0) -> None:
    """Spin until the checkpoint of `step` is being written (its temporary file exists) or is written: a SIGKILL
    sent then lands inside the write or just after it."""
    final, deadline = checkpoint_name(step), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        names = os.listdir(folder)
        if final in names or any(n.startswith(f"{final}.tmp.") for n in names):
            return


def plan(seed: int, count: int) -> list[tuple[str, int]]:
    """(kind, target step) pairs, reproducible: the kinds in a seeded order, targets increasing so that each
    resumed segment still has the moment ahead of it."""
    rng = random.Random(seed)
    kinds = rng.sample(["step", "checkpoint", "eval"], count)
    return list(zip(kinds, sorted(rng.sample(range(2, 12), count))))


def interrupted_run(root: str, tmp_path, sig: signal.Signals, moments: list[tuple[str, int]]) -> str:
    """One run signalled at each moment and resumed with --resume auto each time; returns its final checkpoint."""
    out = str(tmp_path / "run")
    for i, (kind, target) in enumerate(moments):
        run = Watched(TRAIN + watched_args(root, out, *(["--resume", "auto"] if i else [])), str(tmp_path / f"e{i}"))
        at = run.until(lambda step, _, k=kind, t=target: is_moment(k, step, t))
        if kind == "checkpoint":
            await_write(out, at)
        run.proc.send_signal(sig)
        code, stdout, stderr = run.finish()
        if sig == signal.SIGKILL:
            assert code == -signal.SIGKILL, f"{kind} at {at}: {stderr[-2000:]}"
        else:
            assert code == 128 + sig and "Traceback" not in stderr, f"{kind} at {at}: {stderr[-3000:]}"
            stopped = int(STOPPED.search(stderr).group(2))
            assert at <= stopped < STEPS and os.path.isfile(os.path.join(out, f"ckpt_{stopped:08d}.pt"))
    run = Watched(TRAIN + watched_args(root, out, "--resume", "auto"), str(tmp_path / "last"))
    code, stdout, stderr = run.finish()
    assert code == 0 and "resumed from" in stdout, stderr[-3000:]
    return os.path.join(out, f"ckpt_{STEPS:08d}.pt")


def test_sigkill_at_random_moments_then_resume_ends_on_the_uninterrupted_weights(synthetic_root, tmp_path, reference):
    final = interrupted_run(synthetic_root, tmp_path, signal.SIGKILL, plan(seed=21, count=3))
    assert_same_state(read(reference), read(final))


def test_sigterm_at_random_moments_then_resume_ends_on_the_uninterrupted_weights(synthetic_root, tmp_path, reference):
    final = interrupted_run(synthetic_root, tmp_path, signal.SIGTERM, plan(seed=43, count=2))
    assert_same_state(read(reference), read(final))
