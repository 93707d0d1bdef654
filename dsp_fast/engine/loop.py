"""One training run of the fast trainer: the step loop over the `Trainer`, and what happens between steps (logging,
the skipped-step guard, evaluation, image grids, checkpoints, signals). Host reads of device values happen only on
log steps, every `max_bad_steps` steps (the guard), and at checkpoints / evaluations. A signal is answered after the
step's logging, evaluation and checkpoint, through one CPU all-reduce of two ints per step with several ranks, so
that every rank stops (or checkpoints) at the same step.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os

import torch

from dsp_fast.checkpoint_file import atomic_torch_save
from dsp_fast.data import DatasetError
from dsp_fast.engine import checkpoint as ckpt_io
from dsp_fast.engine.distributed import agree_max, gather_objects
from dsp_fast.engine.monitor import memory_figures, save_image_grid
from dsp_fast.engine.signals import StopRequested, StopSignals
from dsp_fast.engine.step import read_stats
from dsp_fast.engine.trainer import Trainer
from dsp_fast.evaluate import format_iou_table, mean_iou, target_iou
from dsp_fast.run_io import lr_figures


class NonFiniteStop(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient: the run stopped (after a checkpoint)."""


def save_checkpoint(run: Trainer) -> str:
    """A checkpoint at the step reached: every rank hands over its RNG states; rank 0 writes it and prunes to the
    last K. Returns its path (the one rank 0 writes, on every rank)."""
    payload = run.state_dict()
    if run.info.is_main:
        ckpt_io.save(run.run_dir, payload, run.cfg.fast.keep_last)
    return os.path.join(run.run_dir, ckpt_io.checkpoint_name(run.step_index))


def train(run: Trainer, final_eval: bool = True,
          signals: StopSignals | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Train from run.step_index to train.max_steps; on rank 0 returns the final target IoU of the student (the
    figure reported) and the teacher (None elsewhere, and without `final_eval`: a finished run resumed). The caller
    closes the trainer. `signals`: answered at each step boundary (StopRequested after a checkpoint)."""
    if run.step_index < run.cfg.train.max_steps:
        with signals.armed() if signals is not None else contextlib.nullcontext():
            _loop(run, signals)
    if run.info.enabled:
        check_ranks_in_sync(run)
    if not (run.info.is_main and final_eval):
        return None
    return target_iou(run.cfg, run.student), target_iou(run.cfg, run.teacher)  # rank 0 only


def check_ranks_in_sync(run: Trainer) -> None:
    """DDP must leave every rank with the same weights: compare digests of each rank's student and teacher and
    write them to rank_weights.json (a mismatch is printed loudly; it would mean a broken all-reduce or EMA)."""
    h = hashlib.sha256()
    for t in itertools.chain(run.student.parameters(), run.teacher.parameters()):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    digests = gather_objects(h.hexdigest(), run.info)
    if run.info.is_main:
        same = len(set(digests)) == 1
        with open(os.path.join(run.run_dir, "rank_weights.json"), "w") as f:
            json.dump({"identical": same, "sha256": digests}, f, indent=1)
        run.say(f"DDP check: weights {'identical' if same else 'DIFFER'} on the {len(digests)} ranks")


def _loop(run: Trainer, signals: StopSignals | None) -> None:
    cfg, start = run.cfg, run.step_index
    run.log.start(cfg.train.max_steps, run.images_per_step, start)
    wait = 0.0
    try:
        for step in range(start, cfg.train.max_steps):
            try:
                wait += run.step()
            except DatasetError as e:  # a prepared file went bad after preparation: keep what was trained
                if run.info.enabled or step == start:  # a checkpoint is collective; one rank is failing
                    raise
                save_checkpoint(run)
                raise DatasetError(f"{e}\nThe run stopped at step {step} with a checkpoint in {run.run_dir} "
                                   "(--resume continues it once the file is fixed)") from None
            if _between_steps(run, step + 1, wait):
                wait = 0.0
            if signals is not None:
                answer_signals(run, signals, step + 1)
    finally:
        run.close_loader()


def _between_steps(run: Trainer, done: int, wait: float) -> bool:
    """Logging, the guard, evaluation, pictures and checkpoints after step `done`; True when the log consumed
    the data-wait time."""
    cfg, opts, ctx = run.cfg, run.cfg.fast, run.ctx
    last = done == cfg.train.max_steps
    logged = bool(cfg.train.log_every) and (done % cfg.train.log_every == 0 or last)
    consecutive = None
    if logged:
        means, skipped, consecutive = read_stats(ctx)
        run.skipped_total += skipped
        values = {**means, "skipped": float(run.skipped_total), **memory_figures(run.info.device)}
        lr = lr_figures(run.optimizer.param_groups)  # a device lr: read on log steps only, after read_stats synced
        run.log.step(done, values, data_s=wait, lr=lr)
        run.log.scalars(done, {**values, **lr})
    elif done % opts.max_bad_steps == 0:
        consecutive = int(ctx.counts[2].item())
    if consecutive is not None and consecutive >= opts.max_bad_steps:
        save_checkpoint(run)
        raise NonFiniteStop(f"{consecutive} consecutive steps had a non-finite loss or gradient (up to step {done}); "
                            f"stopped with a checkpoint in {run.run_dir}. Lower optim.lr or check the data.")
    if cfg.train.eval_every and done % cfg.train.eval_every == 0 and not last and run.info.is_main:
        _periodic_eval(run, done)
    if opts.image_every and done % opts.image_every == 0 and cfg.dsp.enabled and run.info.is_main:
        save_image_grid(os.path.join(run.run_dir, "images", f"step_{done:08d}.png"), ctx, run.buf)
    if checkpoint_due(run, done):
        save_checkpoint(run)
    return logged


def checkpoint_due(run: Trainer, done: int) -> bool:
    """Whether the periodic schedule writes a checkpoint after step `done` (the last step always)."""
    every = run.cfg.train.checkpoint_every
    return done == run.cfg.train.max_steps or bool(every and done % every == 0)


def answer_signals(run: Trainer, signals: StopSignals, done: int) -> None:
    """After step `done`: the signals any rank got, agreed by all; a stop writes a checkpoint (unless the schedule
    has just written this step's), checks that the ranks agree, and raises StopRequested; a SIGUSR1 writes a
    checkpoint and the run goes on."""
    stop, asked = agree_max([signals.stop_signum, int(signals.take_checkpoint_request())], run.info)
    if not (stop or asked):
        return
    path = os.path.join(run.run_dir, ckpt_io.checkpoint_name(done))
    if not checkpoint_due(run, done):
        path = save_checkpoint(run)
    if not stop:
        run.say(f"[signal] checkpoint at step {done}: {path}")
        return
    if run.info.enabled:
        check_ranks_in_sync(run)
    raise StopRequested(stop, f"at step {done} of {run.cfg.train.max_steps}, checkpoint {path}")


def _periodic_eval(run: Trainer, done: int) -> None:
    iou = target_iou(run.cfg, run.student)  # rank 0 only: the other ranks go on to the next step's collectives
    miou = mean_iou(iou)
    run.log.metrics(done, {"eval/mIoU": miou})
    run.log.scalars(done, {"eval/mIoU": miou})
    run.say(f"[eval] step {done}: target IoU of the student\n{format_iou_table(iou)}")
    if miou > run.best_miou:
        run.best_miou = miou
        payload = run.state_dict(all_ranks=False)  # rank 0's RNG only: not for an exact resume
        atomic_torch_save({**payload, "eval_miou": miou}, os.path.join(run.run_dir, ckpt_io.BEST))
