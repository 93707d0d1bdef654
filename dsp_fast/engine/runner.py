"""The whole job: join the process group, prepare the data, train source-only (when train.compare_source_only) and
DSP, and print the target-IoU table of each and the comparison, as `dsp_fast.reference.run` does."""

from __future__ import annotations

import dataclasses
import os
import time

import torch

from dsp_fast.config import Config
from dsp_fast.engine import checkpoint as ckpt_io
from dsp_fast.engine.data import prepared_dirs, resolve_backend
from dsp_fast.engine.distributed import DistInfo, barrier, init_distributed, teardown
from dsp_fast.engine.loop import setup, train
from dsp_fast.engine.monitor import FastRunLog, NullLog
from dsp_fast.engine.options import FastOptions, OptionsError
from dsp_fast.evaluate import format_iou_table, mean_iou
from dsp_fast.kernels import set_value_checks
from dsp_fast.run_io import resolve_device


def plan_runs(cfg: Config) -> list[tuple[str, Config, str]]:
    """(name, config, run sub-folder): the adapted run, preceded by its source-only twin when comparing."""
    runs = [("adapted (DSP)" if cfg.dsp.enabled else "source-only", cfg, "")]
    if cfg.train.compare_source_only and cfg.dsp.enabled:
        src_only = dataclasses.replace(cfg, dsp=dataclasses.replace(cfg.dsp, enabled=False))
        runs = [("source-only", src_only, "source_only"), ("adapted (DSP)", cfg, "dsp")]
    return runs


def check_supported(cfg: Config) -> None:
    """The authors'-script switches that dsp_fast.method does not implement: refuse them rather than silently
    train something else than the config says (the reference trainer runs them)."""
    d = cfg.dsp
    bad = [name for name, on in (("dsp.share_first_mask", d.share_first_mask),
                                 ("dsp.paste_ignore_label", d.paste_ignore_label),
                                 ("dsp.long_tail_search='retry'", d.long_tail_search == "retry")) if on]
    if bad:
        raise OptionsError(f"{', '.join(bad)}: not implemented by the fast trainer's step (dsp_fast.method); "
                           "use python -m dsp_fast.reference for these authors'-script behaviours")


def configure_backends(opts: FastOptions, info: DistInfo) -> None:
    if opts.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)  # a few CUDA backward ops have no deterministic twin
        torch.backends.cudnn.benchmark = False
    elif info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotune once
    if info.device.type == "cuda":
        # The kernels' label-value check reads a flag on the host after every launch; the prepared labels were
        # checked when they were written and the pseudo-labels are argmaxes, so the step skips it (no sync).
        set_value_checks(False)


def run_all(cfg: Config, opts: FastOptions) -> dict[str, float]:
    """Train every planned run; returns {name: target mIoU} (on rank 0; empty elsewhere)."""
    t0 = time.time()
    device = resolve_device(cfg.train.device)
    check_supported(cfg)
    runs = plan_runs(cfg)
    dirs = {sub: os.path.join(cfg.train.out_dir, sub) if sub else cfg.train.out_dir for _, _, sub in runs}
    # a bad --resume fails here, before any data is generated or any process group joined
    resumes = {sub: _read_resume(opts.resume, dirs[sub], sub, run_cfg) for _, run_cfg, sub in runs}
    if opts.graphs_on(device):
        # NOT YET RUN ON A GPU: NCCL collectives inside a captured graph need the watchdog's async error
        # handling off (PyTorch CUDA-graph notes, "Usage with DistributedDataParallel").
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
    info = init_distributed(device)
    try:
        configure_backends(opts, info)
        resolve_backend(opts, info)  # an unusable --data-backend fails here, before any data is prepared
        data_dirs = prepared_dirs(cfg, opts, info)
        results: dict[str, float] = {}
        for name, run_cfg, sub in runs:
            iou = _train_one(run_cfg, opts, info, data_dirs, dirs[sub], sub, name, resumes.pop(sub))
            if info.is_main:
                print(f"\n[{name}] target IoU after {run_cfg.train.max_steps} steps:\n{format_iou_table(iou)}\n",
                      flush=True)
                results[name] = mean_iou(iou)
        if info.is_main:
            print(f"{'model':<16}target mIoU")
            for name, value in results.items():
                print(f"{name:<16}{100 * value:5.1f}")
            print(f"total time {time.time() - t0:.0f} s (world size {info.world_size}, {info.device})", flush=True)
        return results
    finally:
        teardown(info)


def _read_resume(spec: str, run_dir: str, sub: str, cfg: Config) -> tuple[str, dict] | None:
    """The checkpoint to continue (path, contents), read and checked against the config; None: a fresh start."""
    path = ckpt_io.resolve_resume(spec, run_dir, sub)
    if path is None:
        return None
    ckpt = ckpt_io.load(path)
    ckpt_io.check_compatible(ckpt, path, cfg.to_dict())
    return path, ckpt


def _train_one(cfg: Config, opts: FastOptions, info: DistInfo, data_dirs: tuple[str, str], run_dir: str, sub: str,
               name: str, resume: tuple[str, dict] | None) -> torch.Tensor | None:
    if info.is_main:
        os.makedirs(run_dir, exist_ok=True)
        ckpt_io.clean_stale(run_dir)
        if not resume and (moved := ckpt_io.set_aside(run_dir)):
            print(f"[fast {name}] fresh start: earlier checkpoints of {run_dir} moved to {moved}", flush=True)
        if opts.resume == "auto" and not resume:
            print(f"[fast {name}] --resume auto: no checkpoint in {run_dir}, starting fresh", flush=True)
    barrier(info)  # nobody reads the folder while rank 0 rearranges it
    log = FastRunLog(cfg, sub, f"fast {name}", opts.tensorboard) if info.is_main else NullLog()
    try:
        run = setup(cfg, opts, info, run_dir, log, resume)
        return train(run, data_dirs)
    finally:
        log.close()
