"""The whole job: join the process group, prepare the data, train source-only (when train.compare_source_only) and
DSP, and print the target-IoU table of each and the comparison, as `dsp_fast.reference.run` does."""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
import sys
import time

import torch

from dsp_fast.config import Config
from dsp_fast.engine import checkpoint as ckpt_io
from dsp_fast.engine.data_setup import prepared_dirs, resolve_backend
from dsp_fast.engine.distributed import DistInfo, barrier, broadcast_object, init_distributed, per_rank_batch, teardown
from dsp_fast.engine.loop import train
from dsp_fast.engine.monitor import FastRunLog, NullLog
from dsp_fast.engine.signals import StopRequested, StopSignals
from dsp_fast.engine.trainer import Trainer, configure_backends, graphs_on, resolved_settings
from dsp_fast.evaluate import format_iou_table
from dsp_fast.models import check_weights_file
from dsp_fast.resume import check_out_dir, find_checkpoints, has_checkpoint, new_run_dir
from dsp_fast.run_io import (
    format_final_report,
    format_final_table,
    recorded_seconds,
    resolve_device,
    write_provenance,
    write_summary,
)


def plan_runs(cfg: Config) -> list[tuple[str, Config, str]]:
    """(name, config, run sub-folder): the adapted run, preceded by its source-only twin when comparing."""
    runs = [("adapted (DSP)" if cfg.dsp.enabled else "source-only", cfg, "")]
    if cfg.train.compare_source_only and cfg.dsp.enabled:
        src_only = dataclasses.replace(cfg, dsp=dataclasses.replace(cfg.dsp, enabled=False))
        runs = [("source-only", src_only, "source_only"), ("adapted (DSP)", cfg, "dsp")]
    return runs


def run_all(cfg: Config, resume: str = "") -> dict[str, float]:
    """Train every planned run in a new run folder (or the one `resume`, the invocation's --resume, continues);
    returns {name: target mIoU} (on rank 0; empty elsewhere). SIGINT / SIGTERM stop it with StopRequested
    (engine/signals.py), which names the folder to resume."""
    box: list[str | None] = [None]  # the run folder, once known
    with StopSignals(announce=os.environ.get("RANK", "0") == "0") as signals:
        try:
            return _run_all(cfg, resume, signals, box)
        except StopRequested as e:
            top = box[0]
            if top is not None and has_checkpoint(top, ckpt_io.CHECKPOINTS):
                e.resume_dir = os.path.abspath(top)
                e.resume_command = resume_command(e.resume_dir, int(os.environ.get("WORLD_SIZE", "1")))
            raise


def resume_command(run_dir: str, world_size: int) -> str:
    """The command that continues `run_dir` from this folder (the saved config's data paths are relative to it)."""
    train = ["-m", "dsp_fast.train", "--resume", run_dir]
    if world_size == 1:
        launcher = [sys.executable]
    elif int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) == world_size:
        launcher = ["torchrun", "--standalone", f"--nproc_per_node={world_size}"]
    else:  # several nodes: the rendezvous options are the launcher's, not ours to guess
        return f"cd {shlex.quote(os.getcwd())} && torchrun <the same options on every node> {shlex.join(train)}"
    return f"cd {shlex.quote(os.getcwd())} && {shlex.join(launcher + train)}"


def _run_all(cfg: Config, resume: str, signals: StopSignals, box: list[str | None]) -> dict[str, float]:
    t0 = time.time()
    device = resolve_device(cfg.train.device)
    # before any data is prepared or any folder made: the weights against model.arch, the folder runs go to
    for line in check_weights_file(cfg.model):
        if os.environ.get("RANK", "0") == "0":
            print(f"note: {line}", flush=True)
    check_out_dir(cfg.train.out_dir)
    runs = plan_runs(cfg)
    # a bad --resume fails here, before any data is generated or any process group joined; nothing is created
    # before init_distributed, so every rank finds the same folder
    top, resumes = find_checkpoints(resume, cfg.train.out_dir, [(sub, c) for _, c, sub in runs], ckpt_io.CHECKPOINTS)
    box[0] = top
    if graphs_on(cfg.fast, device):
        # NCCL collectives inside a captured graph need the watchdog's async error
        # handling off (PyTorch CUDA-graph notes, "Usage with DistributedDataParallel").
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
    info = init_distributed(device)
    try:
        # fail-fast checks before any data is prepared; the Trainer takes these values itself
        per_rank_batch(cfg.data.batch_size, info.world_size)
        resolve_backend(cfg.fast, info)  # an unusable --data-backend fails here
        configure_backends(cfg.fast, info.device)
        data_dirs = prepared_dirs(cfg, info)
        if top is None:
            top = box[0] = broadcast_object(new_run_dir(cfg.train.out_dir) if info.is_main else None, info)
        if info.is_main:
            print(f"run folder: {os.path.abspath(top)}{' (resumed)' if any(resumes.values()) else ''}", flush=True)
            write_provenance(top, info.device)
        results: dict[str, float] = {}
        summary: dict = {"run_dir": os.path.abspath(top), "models": {}}
        # the training seconds of earlier starts, up to the checkpoints continued from, count in the run's total
        earlier = sum(recorded_seconds(os.path.join(top, sub), hit[1]["step"]) for sub, hit in resumes.items() if hit)
        for name, run_cfg, sub in runs:
            folder = os.path.join(top, sub) if sub else top
            record = _train_one(run_cfg, info, data_dirs, folder, name, resumes.pop(sub), signals)
            if info.is_main:
                results[name] = math.nan if record["mIoU"] is None else record["mIoU"]
                summary["models"][name] = {"folder": os.path.abspath(folder), "steps": run_cfg.train.max_steps,
                                           **record}
        if info.is_main:
            print(format_final_table(summary["models"], cfg.model.num_classes))
            total = earlier + time.time() - t0
            summary.update(total_s=round(total, 1), earlier_s=round(earlier, 1), world_size=info.world_size,
                           device=str(info.device))
            path = write_summary(top, summary)
            before = f", {earlier:.0f} s of it before the resume" if earlier else ""
            print(f"total time {total:.0f} s{before} (world size {info.world_size}, {info.device})")
            print(f"run folder: {os.path.abspath(top)} (summary: {os.path.abspath(path)})", flush=True)
        return results
    finally:
        teardown(info)


def _train_one(cfg: Config, info: DistInfo, data_dirs: tuple[str, str], run_dir: str,
               name: str, resume: tuple[str, dict] | None, signals: StopSignals | None = None) -> dict | None:
    """Train one model in `run_dir`; on rank 0, print its target IoU table and return its final figures (also the
    last record of its metrics.jsonl)."""
    if info.is_main:
        os.makedirs(run_dir, exist_ok=True)
        ckpt_io.clean_stale(run_dir)
        old_log = os.path.join(run_dir, "metrics.jsonl")
        if not resume and os.path.exists(old_log):  # a resumed run whose model had no checkpoint yet
            kept = next(p for k in range(1, 10_000) if not os.path.exists(p := f"{old_log[:-6]}.{k}.jsonl"))
            os.replace(old_log, kept)
            print(f"[fast {name}] no checkpoint to continue in {run_dir}: this model starts at step 0; the log of "
                  f"its earlier start is kept as {kept}", flush=True)
    barrier(info)  # nobody reads the folder while rank 0 prepares it
    log = FastRunLog(cfg, run_dir, f"fast {name}", resolved_settings(cfg.fast, info)) if info.is_main else NullLog()
    run = None
    try:
        run = Trainer(cfg, info, data_dirs, run_dir, log, resume)
        # a finished run resumed: its final record stands (a second one would make metrics.jsonl say the run
        # ended twice); only rank 0 reads the log, and only rank 0 evaluates anyway
        done = log.recorded_final(cfg.train.max_steps) if info.is_main and run.step_index >= cfg.train.max_steps \
            else None
        ious = train(run, final_eval=done is None, signals=signals)
        if not info.is_main:
            return None
        if done is not None:  # null in the record: a class neither in the labels nor predicted
            iou = torch.tensor([math.nan if v is None else v for v in done["iou"].values()], dtype=torch.float64)
            print(f"[{name}] already finished at step {cfg.train.max_steps}: its final figures as recorded in "
                  f"{log.path('metrics.jsonl')} (python -m dsp_fast.evaluate evaluates a checkpoint again):\n"
                  f"{format_iou_table(iou)}\n", flush=True)
            return done
        iou, teacher_iou = ious
        print(format_final_report(name, cfg.train.max_steps, iou, teacher_iou, format_iou_table(iou)), flush=True)
        return log.final(cfg.train.max_steps, iou, teacher_iou)
    finally:
        if run is not None:
            run.close()  # the DDP wrapper goes before the process group
        log.close()
