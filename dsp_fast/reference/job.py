"""The naive DSP reference trainer's run and command line (the package docstring says what the reference is for).
Step numbers in comments refer to docs/method.md.

    python -m dsp_fast.reference [--config synthetic|gta2cs|synthia2cs|FILE.yaml] [section.field=value ...]
    python -m dsp_fast.reference ... --resume auto|RUN_FOLDER|last.pt    # continue, bit for bit (resume.py)

Image tensors are RGB floats in 0..1 until `normalize_input` right before the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from dsp_fast.config import Config, ConfigError, load_config, split_overrides
from dsp_fast.data import SOURCE_RESAMPLE, DatasetError, load_or_build_class_index
from dsp_fast.data.build import check_data, source_dataset, target_dataset
from dsp_fast.evaluate import format_iou_table, mean_iou, target_iou
from dsp_fast.models import build_student_teacher, check_weights_file
from dsp_fast.reference.choices import StepChoices, draw_choices
from dsp_fast.reference.data import LongTailSource, RandomCrops, forever
from dsp_fast.reference.optim import build_optimizer
from dsp_fast.reference.resume import CHECKPOINTS, restore, save_state
from dsp_fast.reference.step import train_step
from dsp_fast.resume import ResumeError, find_checkpoints, new_run_dir, resume_config
from dsp_fast.run_io import (
    EXIT_WRITE_FAILED,
    RunLog,
    RunWriteError,
    format_final_report,
    format_final_table,
    resolve_device,
    write_provenance,
    write_summary,
)


@dataclasses.dataclass
class ReferenceRun:
    """What a reference run holds between steps: data streams, the two models, the optimizer, the choice RNG."""

    cfg: Config
    device: torch.device
    source: Dataset
    gen: torch.Generator
    src_iter: Iterator
    tmpl_iter: Iterator | None  # None with dsp.template 'source': the source batch is the template
    tgt_iter: Iterator
    student: torch.nn.Module
    teacher: torch.nn.Module
    optimizer: torch.optim.Optimizer
    long_tail: LongTailSource | None = None  # step 3's crops (set by build_run); None with dsp.num_long_tail 0


def build_run(cfg: Config) -> ReferenceRun:
    torch.manual_seed(cfg.train.seed)
    gen = torch.Generator().manual_seed(cfg.train.seed + 1)
    device = resolve_device(cfg.train.device)
    source = source_dataset(cfg)
    target = target_dataset(cfg, "train", labels=False)
    d = cfg.data

    def loader(dataset, base_size, seed):
        resample = SOURCE_RESAMPLE if dataset is source else "bilinear"
        return forever(DataLoader(RandomCrops(dataset, base_size, d.crop_size, resample), batch_size=d.batch_size,
                                  shuffle=True, drop_last=True, num_workers=d.num_workers,
                                  generator=torch.Generator().manual_seed(seed)))

    src_iter = loader(source, d.source_size, cfg.train.seed + 10)
    tmpl_iter = None
    if cfg.dsp.template == "separate":  # a second, independently shuffled source stream
        tmpl_iter = loader(source, d.source_size, cfg.train.seed + 20)
    tgt_iter = loader(target, d.target_size, cfg.train.seed + 30)
    student, teacher = build_student_teacher(cfg.model, device)
    optimizer = build_optimizer(cfg, student)
    long_tail = None
    if cfg.dsp.num_long_tail > 0:  # the class -> images index is built (or read) only when crops are drawn
        class_index = load_or_build_class_index(source, cfg.model.num_classes)
        long_tail = LongTailSource(source, class_index, cfg.dsp.long_tail_size, d.crop_size)
    return ReferenceRun(cfg, device, source, gen, src_iter, tmpl_iter, tgt_iter, student, teacher, optimizer,
                        long_tail)


def next_data(run: ReferenceRun) -> tuple[torch.Tensor, ...]:
    """One step's crops (x_s, y_s, x_m, y_m, x_t); with dsp.template 'source' the template is the source batch."""
    x_s, y_s = next(run.src_iter)
    x_m, y_m = (x_s, y_s) if run.tmpl_iter is None else next(run.tmpl_iter)  # before the target: the crops' RNG order
    return x_s, y_s, x_m, y_m, next(run.tgt_iter)


def next_batch(run: ReferenceRun) -> tuple[list[torch.Tensor], StepChoices]:
    """One step's data: source, template and target crops, and the step's random choices, on the device."""
    x_s, y_s, x_m, y_m, x_t = next_data(run)
    choices = draw_choices(run.cfg, y_m, run.long_tail, run.gen)
    if run.device.type != "cpu":
        choices.long_tail = [[(c, i.to(run.device), lb.to(run.device)) for c, i, lb in crops]
                             for crops in choices.long_tail]
        choices.class_sel = choices.class_sel.to(run.device)
    return [t.to(run.device) for t in (x_s, y_s, x_m, y_m, x_t)], choices


class BadInputStop(RuntimeError):
    """A data file failed mid-run: the run stopped after saving a checkpoint; the message names the file."""


def _dataset_error_text(e: Exception) -> str:
    """The message of a DatasetError, also when a DataLoader worker re-raised it wrapped in its traceback."""
    text = str(e)
    if "Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if last.startswith(("dsp_fast.", "DatasetError")) and ": " in last else last
    return text


def train(cfg: Config, log: RunLog, resume: dict | None = None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The whole reference run (from `resume`, the checkpoint resume.find_checkpoints found); returns
    (student, teacher). A file that cannot be read stops the run with a checkpoint of the last finished step
    (BadInputStop)."""
    run = build_run(cfg)
    student, teacher, optimizer = run.student, run.teacher, run.optimizer
    start = 0 if resume is None else restore(run, resume, lambda: next_data(run))
    if resume is not None:
        print(f"[{log.title}] resumed from {log.path('last.pt')} at step {start}", flush=True)
    # a source-only step reads and trains on the source batch alone
    log.start(cfg.train.max_steps, images_per_step=cfg.dsp.batches_per_step() * cfg.data.batch_size,
              start_step=start)
    for step in range(start, cfg.train.max_steps):
        t_data = time.perf_counter()
        rng_before = {"cpu": torch.get_rng_state(), "choices": run.gen.get_state()}  # a bad file stops mid-draw
        try:
            batch, choices = next_batch(run)
        except DatasetError as e:
            path = log.path("last.pt")
            save_state(path, run, step, rng_before)
            raise BadInputStop(f"{_dataset_error_text(e)}\n1 unreadable file found at step {step} of "
                               f"{cfg.train.max_steps} (the reference trainer reads the original files as it trains, "
                               f"so it stops at the first; python -m dsp_fast.prepare lists them all in rejects.txt)."
                               f" The run stopped with a checkpoint of step {step}: {path}") from None
        data_s = time.perf_counter() - t_data
        losses = train_step(cfg, student, teacher, optimizer, step, batch, choices)
        if not math.isfinite(losses["loss"]):
            raise FloatingPointError(f"reference trainer: non-finite loss {losses} at step {step}")
        log.step(step + 1, losses, data_s=data_s)
        if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and step + 1 < cfg.train.max_steps:
            run_eval(cfg, student, log, step + 1)
        if cfg.train.checkpoint_every and (step + 1) % cfg.train.checkpoint_every == 0:
            save_state(log.path("last.pt"), run, step + 1)
    if start < cfg.train.max_steps or resume is None:
        save_state(log.path("last.pt"), run, cfg.train.max_steps)
    return student, teacher


def run_eval(cfg: Config, model: torch.nn.Module, log: RunLog, step: int) -> torch.Tensor:
    """Target IoU of `model`, logged and returned."""
    iou = target_iou(cfg, model)
    log.metrics(step, {"eval/mIoU": mean_iou(iou)})
    return iou


def run(cfg: Config, resume: str = "") -> dict[str, float]:
    """Check the data, train (and, with train.compare_source_only, a source-only twin run), evaluate, print the
    table; the run gets a new folder `<train.out_dir>/reference[_<n>]`, with summary.json at the end. `resume`
    ('auto', a run folder or its last.pt) continues that folder instead: each model from its last.pt (a model
    without one starts at step 0)."""
    check_weights_file(cfg.model)  # the weights file and every data root, split and layout now, before any folder
    check_data(cfg)
    runs = [("adapted (DSP)", cfg)]
    if cfg.train.compare_source_only and cfg.dsp.enabled:
        src_only = dataclasses.replace(cfg, dsp=dataclasses.replace(cfg.dsp, enabled=False))
        runs.insert(0, ("source-only", src_only))
    results = {}
    t0 = time.time()
    leaves = {name: ("source_only" if not c.dsp.enabled else "dsp") if len(runs) > 1 else "" for name, c in runs}
    top, found = find_checkpoints(resume, cfg.train.out_dir, [(leaves[name], c) for name, c in runs], CHECKPOINTS)
    states = {name: hit[1] if (hit := found[leaves[name]]) else None for name, _ in runs}
    # under <out_dir>/reference: the fast trainer owns <out_dir> itself
    top = top or new_run_dir(os.path.join(cfg.train.out_dir, "reference"))
    print(f"run folder: {os.path.abspath(top)}{' (resumed)' if any(states.values()) else ''}", flush=True)
    write_provenance(top, resolve_device(cfg.train.device))
    summary: dict = {"run_dir": os.path.abspath(top), "models": {}}
    for name, run_cfg in runs:
        leaf = leaves[name]
        log = RunLog(run_cfg, os.path.join(top, leaf) if leaf else top, title=f"reference {name}")
        try:
            student, teacher = train(run_cfg, log, states.pop(name))
            iou, teacher_iou = run_eval(run_cfg, student, log, run_cfg.train.max_steps), target_iou(run_cfg, teacher)
            print(format_final_report(name, run_cfg.train.max_steps, iou, teacher_iou, format_iou_table(iou)))
            record = log.final(run_cfg.train.max_steps, iou, teacher_iou)
        finally:
            log.close()
        results[name] = mean_iou(iou)
        summary["models"][name] = {"folder": os.path.abspath(log.dir), "steps": run_cfg.train.max_steps, **record}
    print(format_final_table(summary["models"], cfg.model.num_classes))
    summary["total_s"] = round(time.time() - t0, 1)
    print(f"total time {time.time() - t0:.0f} s")
    print(f"run folder: {os.path.abspath(top)} (summary: {os.path.abspath(write_summary(top, summary))})")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsp_fast.reference", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="synthetic", help="preset name (synthetic, gta2cs, synthia2cs) or YAML")
    parser.add_argument("--resume", default="", metavar="PATH|auto",
                        help="continue a reference run: 'auto' (the newest under train.out_dir), its folder or last.pt")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. train.max_steps=100")
    flags, overrides = split_overrides(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(flags)
    args.overrides = [*args.overrides, *overrides]
    try:
        run(resume_config(args.resume, args.overrides, lambda: load_config(args.config, args.overrides), CHECKPOINTS),
            args.resume)
    except (ConfigError, DatasetError, BadInputStop, ResumeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunWriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    return 0
