"""One training run of the fast trainer: setup (models, features, resume), the step loop, and what happens
between steps (logging, the skipped-step guard, evaluation, image grids, checkpoints).

Host reads of device values happen only on log steps, every `max_bad_steps` steps (the guard), and at
checkpoints / evaluations; the step itself never syncs (see engine/step.py).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import itertools
import json
import math
import os
import time
from typing import Any

import torch
from torch import nn

from dsp_fast.augment import blur_kernel_shape
from dsp_fast.config import Config
from dsp_fast.data import DatasetError
from dsp_fast.data.build import target_dataset
from dsp_fast.engine import checkpoint as ckpt_io
from dsp_fast.engine.data import build_step_loader
from dsp_fast.engine.distributed import DistInfo, gather_objects
from dsp_fast.engine.features import (
    apply_channels_last,
    apply_compile,
    apply_ddp,
    build_grad_scaler,
    build_models,
    build_optimizer,
    make_normalize,
    scheduled_lr,
)
from dsp_fast.engine.graphs import make_step_runner
from dsp_fast.engine.monitor import memory_figures, save_image_grid
from dsp_fast.engine.options import FastOptions
from dsp_fast.engine.step import StepBuffers, StepContext, draw_choices_, read_stats, train_step
from dsp_fast.engine.sync import convert_global_bn, gather_rows, per_rank_batch, sum_over_ranks
from dsp_fast.evaluate import evaluate, format_iou_table, iou_from_confusion, mean_iou
from dsp_fast.method import LossSettings
from dsp_fast.models import PROJECTION_ROOT


class NonFiniteStop(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient: the run stopped (after a checkpoint)."""


@dataclasses.dataclass
class Run:
    """One model's training: the pieces the loop and the checkpoints share."""

    cfg: Config
    opts: FastOptions
    info: DistInfo
    run_dir: str
    log: Any  # FastRunLog on rank 0, NullLog elsewhere
    student: nn.Module  # the module itself (ctx.student is the DDP wrapper when distributed)
    teacher: nn.Module
    optimizer: torch.optim.Optimizer
    ctx: StepContext
    gen: torch.Generator
    start_step: int = 0
    best_miou: float = -math.inf
    skipped_total: int = 0

    def say(self, msg: str) -> None:
        if self.info.is_main:
            print(msg, flush=True)


def loss_settings(cfg: Config, world_size: int = 1) -> LossSettings:
    """The step's settings; with several ranks, the collectives that make it the step of the global batch."""
    d = cfg.dsp
    s = LossSettings(cfg.model.num_classes, d.lam, d.conf_threshold, d.mmd_weight, d.mmd_kernel_mul,
                     d.mmd_kernel_num, d.drop_target_soft_term, d.enabled,
                     blur_kernel_shape(cfg.data.crop_size[1], cfg.data.crop_size[0]), d.kornia_hsv_quirk,
                     d.long_tail_paste == "columns", d.share_first_mask, d.paste_ignore_label)
    if world_size > 1:
        s.world_size, s.sum_ranks, s.gather_rows = world_size, sum_over_ranks, gather_rows
    return s


def choice_generator(seed: int, rank: int, device: torch.device) -> torch.Generator:
    """The device generator of the step's random choices: its own stream per rank, apart from model init."""
    return torch.Generator(device=device).manual_seed(1_000_003 * (rank + 1) + seed)


def setup(cfg: Config, opts: FastOptions, info: DistInfo, run_dir: str, log: Any,
          resume: tuple[str, dict[str, Any]] | None) -> Run:
    """Models, optimizer and features in order (channels_last, optimizer, scaler, resume, DDP), and the step context.
    resume: (path, checkpoint already read and checked by checkpoint.load / check_compatible)."""
    device = info.device
    per_rank_batch(cfg.data.batch_size, info.world_size)
    student, teacher = build_models(cfg, device)
    if info.enabled:  # BN statistics over the global batch, the teacher's too (DSP_METHOD "Scaling out")
        convert_global_bn(student, device)
        convert_global_bn(teacher, device)
    if opts.channels_last:
        apply_channels_last(student, teacher)
    optimizer, device_skip = build_optimizer(cfg, student, opts, device)
    dtype = opts.amp_dtype(device)
    scaler = build_grad_scaler(dtype, device)
    gen = choice_generator(cfg.train.seed, info.rank, device)
    ckpt = resume[1] if resume else None
    if ckpt is not None:
        _load_state(ckpt, student, teacher, optimizer, scaler, gen, info, cfg)
    if not cfg.dsp.enabled:
        freeze_projection(student)
    ddp = apply_ddp(student, info, find_unused=False)
    graphs = opts.graphs_on(device) and device_skip
    ctx = StepContext(loss_settings(cfg, info.world_size), ddp, teacher, optimizer,
                      make_normalize(student.input_kind, device), dtype, scaler, cfg.dsp.ema_max, device_skip,
                      sync_flag=info.enabled, autocast_cache=not graphs)
    ctx.compiled_losses = apply_compile(opts.compile, student, teacher)
    run = Run(cfg, opts, info, run_dir, log, student, teacher, optimizer, ctx, gen)
    if ckpt is not None:
        run.start_step, run.best_miou = int(ckpt["step"]), float(ckpt["best_miou"])
        run.skipped_total = int(ckpt["skipped_steps"])
        ctx.counts[2].fill_(int(ckpt["consecutive_skipped"]))
        run.say(f"resumed from {resume[0]} at step {run.start_step}")
    return run


def freeze_projection(student: nn.Module) -> None:
    """Source-only training returns the MMD features and drops them: no gradient ever reaches the projection (its
    grads stay None, so the optimizer skips it, as before). Frozen, DDP registers no hook on it and needs no
    find_unused_parameters traversal, whose cost and warning ("did not find any unused parameters": the dropped
    features are in the forward's output) every source-only torchrun paid."""
    inner = getattr(student, "module", student)
    root = getattr(inner, "param_roots", (None, None, PROJECTION_ROOT))[2]
    for p in inner.get_submodule(root).parameters():
        p.requires_grad_(False)


def _load_state(ckpt: dict[str, Any], student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, gen: torch.Generator, info: DistInfo, cfg: Config) -> None:
    student.load_state_dict(ckpt["student"])
    teacher.load_state_dict(ckpt["teacher"])
    lrs = [g["lr"] for g in optimizer.param_groups]
    optimizer.load_state_dict(ckpt["optimizer"])
    for g, lr in zip(optimizer.param_groups, lrs):  # keep our device lr tensors (the step fills them in place)
        g["lr"] = lr
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    rng = ckpt["rng"]
    if len(rng) == info.world_size:
        ckpt_io.restore_rng_state(rng[info.rank], gen)
    else:  # another world size: the data shards differ anyway; continue, but not bit for bit
        gen.manual_seed(cfg.train.seed + 7919 * (int(ckpt["step"]) + 1) + info.rank)
        if info.is_main:
            print(f"resume: the checkpoint has {len(rng)} ranks, this run {info.world_size}: RNG streams reseeded, "
                  "the run continues but not bit for bit", flush=True)


def save_checkpoint(run: Run, step: int) -> None:
    """Every rank hands over its RNG states; rank 0 writes the checkpoint and prunes to the last K."""
    rng_all = gather_objects(ckpt_io.rng_state(run.gen), run.info)
    if run.info.is_main:
        ckpt_io.save(run.run_dir, _payload(run, step, rng_all), run.opts.keep_last)


def _payload(run: Run, step: int, rng_all: list[Any]) -> dict[str, Any]:
    # skipped steps not yet folded in by a log step count too (a resumed run starts with none pending)
    pending, consecutive = (int(v) for v in run.ctx.counts[1:].tolist())
    return {"format": ckpt_io.FORMAT, "step": step, "student": run.student.state_dict(),
            "teacher": run.teacher.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scaler": run.ctx.scaler.state_dict(), "rng": rng_all, "world_size": run.info.world_size,
            "skipped_steps": run.skipped_total + pending, "consecutive_skipped": consecutive,
            "best_miou": run.best_miou, "config": run.cfg.to_dict(),
            "input_kind": getattr(run.student, "input_kind", "torchvision"), "options": dataclasses.asdict(run.opts)}


def evaluate_target(run: Run, model: nn.Module | None = None) -> torch.Tensor:
    """Per-class target IoU of the student, or of `model` (the teacher, at the end) (rank 0 only: the other ranks
    go on to the next step's collectives)."""
    cfg = run.cfg
    dataset = target_dataset(cfg, cfg.data.eval_split, labels=True)
    conf = evaluate(run.student if model is None else model, dataset, cfg.data.eval_size, cfg.model.num_classes,
                    run.info.device, cfg.data.max_eval_images)
    return iou_from_confusion(conf)


def train(run: Run, dirs: tuple[str, str], final_eval: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Train from run.start_step to train.max_steps; returns the final target IoU of the student (the figure
    reported) and of the teacher on rank 0 (None elsewhere, and without `final_eval`: a finished run resumed,
    whose final figures are already recorded)."""
    cfg = run.cfg
    try:
        if run.start_step < cfg.train.max_steps:
            _loop(run, build_step_loader(cfg, run.opts, run.info, dirs, run.start_step))
        if run.info.enabled:
            check_ranks_in_sync(run)
        if not (run.info.is_main and final_eval):
            return None
        return evaluate_target(run), evaluate_target(run, run.teacher)
    finally:
        # Drop the DDP wrapper before the process group goes (gloo aborts otherwise), even while a traceback
        # still holds the loop's frames (and so the step context).
        if run.ctx is not None:
            run.ctx.student = None  # type: ignore[assignment]
        run.ctx = None  # type: ignore[assignment]
        gc.collect()


def check_ranks_in_sync(run: Run) -> None:
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


def _loop(run: Run, loader) -> None:
    cfg, opts, ctx = run.cfg, run.opts, run.ctx
    run.log.start(cfg.train.max_steps, (3 if cfg.dsp.enabled else 1) * cfg.data.batch_size, run.start_step)
    buf: StepBuffers | None = None
    step_fn = None
    wait = 0.0
    try:
        for step in range(run.start_step, cfg.train.max_steps):
            t0 = time.perf_counter()
            try:
                batch = next(loader)
            except DatasetError as e:  # a prepared file went bad after preparation: keep what was trained
                if run.info.enabled or step == run.start_step:  # a checkpoint is collective; one rank is failing
                    raise
                save_checkpoint(run, step)
                raise DatasetError(f"{e}\nThe run stopped at step {step} with a checkpoint in {run.run_dir} "
                                   "(--resume continues it once the file is fixed)") from None
            wait += time.perf_counter() - t0
            if buf is None:
                buf = StepBuffers.like(batch, cfg.model.num_classes, opts.channels_last, cfg.dsp.paste_ignore_label)
                step_fn = make_step_runner(lambda: train_step(ctx, buf), opts.graphs_on(run.info.device)
                                           and ctx.device_skip, opts.graph_warmup, run.say)
            buf.load_(batch)
            draw_choices_(buf.choices, run.gen, cfg.dsp)
            ctx.set_schedule_(step, scheduled_lr(cfg.optim, step, cfg.train.max_steps))
            step_fn()
            if _between_steps(run, step + 1, buf, wait):
                wait = 0.0
    finally:
        loader.close()


def _between_steps(run: Run, done: int, buf: StepBuffers, wait: float) -> bool:
    """Logging, the guard, evaluation, pictures and checkpoints after step `done`; True when the log consumed
    the data-wait time."""
    cfg, opts, ctx = run.cfg, run.opts, run.ctx
    last = done == cfg.train.max_steps
    logged = bool(cfg.train.log_every) and (done % cfg.train.log_every == 0 or last)
    consecutive = None
    if logged:
        means, skipped, consecutive = read_stats(ctx)
        run.skipped_total += skipped
        values = {**means, "skipped": float(run.skipped_total), **memory_figures(run.info.device)}
        run.log.step(done, values, data_s=wait)
        run.log.scalars(done, values)
    elif done % opts.max_bad_steps == 0:
        consecutive = int(ctx.counts[2].item())
    if consecutive is not None and consecutive >= opts.max_bad_steps:
        save_checkpoint(run, done)
        raise NonFiniteStop(f"{consecutive} consecutive steps had a non-finite loss or gradient (up to step {done}); "
                            f"stopped with a checkpoint in {run.run_dir}. Lower optim.lr or check the data.")
    if cfg.train.eval_every and done % cfg.train.eval_every == 0 and not last and run.info.is_main:
        _periodic_eval(run, done)
    if opts.image_every and done % opts.image_every == 0 and cfg.dsp.enabled and run.info.is_main:
        save_image_grid(os.path.join(run.run_dir, "images", f"step_{done:08d}.png"), ctx, buf)
    if last or (cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0):
        save_checkpoint(run, done)
    return logged


def _periodic_eval(run: Run, done: int) -> None:
    iou = evaluate_target(run)
    miou = mean_iou(iou)
    run.log.metrics(done, {"eval/mIoU": miou})
    run.log.scalars(done, {"eval/mIoU": miou})
    run.say(f"[eval] step {done}: target IoU of the student\n{format_iou_table(iou)}")
    if miou > run.best_miou:
        run.best_miou = miou
        payload = _payload(run, done, [ckpt_io.rng_state(run.gen)])  # rank 0's RNG only: not for an exact resume
        ckpt_io.save_best(run.run_dir, {**payload, "eval_miou": miou})
