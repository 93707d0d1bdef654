"""The fast trainer as one object (models, optimizer, step context, static buffers, loader, run state; the checkpoint
payload is built and restored here only). The training loop, the benchmarks and the scaling workers all drive it, so
a speed figure is the training run's own. Each setting (per-rank batch, autocast dtype, graphs, data backend) is
decided once, here; the process-wide switches in `configure_backends`.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from dsp_fast.config import Config, FastConfig
from dsp_fast.engine import checkpoint as ckpt_io
from dsp_fast.engine.batchnorm import apply_group_bn, convert_global_bn
from dsp_fast.engine.data_setup import build_step_loader, resolve_backend
from dsp_fast.engine.distributed import DistInfo, gather_objects, gather_rows, per_rank_batch, sum_over_ranks
from dsp_fast.engine.graphs import GraphedStep
from dsp_fast.engine.model_setup import (
    apply_channels_last,
    apply_compile,
    apply_ddp,
    apply_fused_bn,
    build_models,
    make_normalize,
)
from dsp_fast.engine.monitor import NullLog, tensorboard_on
from dsp_fast.engine.optimizer import build_grad_scaler, build_optimizer, scheduled_lr
from dsp_fast.engine.step import StepBuffers, StepContext, train_step
from dsp_fast.kernels import _common as kernel_flags
from dsp_fast.kernels import set_value_checks
from dsp_fast.method import Ranks, draw_choices_
from dsp_fast.models import PROJECTION_ROOT, unwrap

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def amp_dtype(fast: FastConfig, device: torch.device) -> torch.dtype:
    """fast.amp as a dtype: 'auto' is bf16 on CUDA, fp32 (autocast off) elsewhere."""
    if fast.amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return AMP_DTYPES[fast.amp]


def graphs_on(fast: FastConfig, device: torch.device) -> bool:
    """Whether the step is captured in a CUDA graph: the one place this is decided. Graphs need CUDA; what a graph
    cannot capture (fp16's GradScaler, the foreach and apex optimizers) FastConfig refuses with cuda_graphs on, so
    every FastConfig that asks for graphs can have them."""
    return fast.cuda_graphs and device.type == "cuda"


def resolved_settings(fast: FastConfig, info: DistInfo) -> dict[str, Any]:
    """What this machine makes of the settings that depend on it, as config.yaml records them beside the config
    (`config.RESOLVED`) and --print-config shows them: the fields keep what was asked ('auto'), so that a resume on
    another machine resolves them there."""
    names = {dtype: name for name, dtype in AMP_DTYPES.items()}
    return {"device": info.device.type, "amp": names[amp_dtype(fast, info.device)],
            "data_backend": resolve_backend(fast, info), "cuda_graphs": graphs_on(fast, info.device),
            "tensorboard": tensorboard_on(fast.tensorboard)}


def value_checks_wanted(fast: FastConfig, device: torch.device) -> bool:
    """The kernels' label-value check reads a flag on the host after every launch: a sync on CUDA, a graph break
    under torch.compile. The prepared labels were checked when they were written and the pseudo-labels are
    argmaxes, so the step skips it there and keeps it only in the eager CPU step."""
    return device.type != "cuda" and fast.compile == "off"


def cpu_threads(fast: FastConfig) -> int:
    """torch's intra-op threads: fast.cpu_threads, or with 0 the CPUs this process may run on (its affinity mask:
    `taskset`, a container's cpuset), unless OMP_NUM_THREADS says otherwise (torchrun sets 1 per process)."""
    if fast.cpu_threads > 0:
        return fast.cpu_threads
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def configure_backends(fast: FastConfig, device: torch.device) -> None:
    """The process-wide switches a fast run sets: CPU threads, determinism or cuDNN autotuning, and the kernels'
    value checks. (OpenMP's spin count is set in the environment by train.py, before torch loads.)"""
    torch.set_num_threads(cpu_threads(fast))
    if fast.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)  # a few CUDA backward ops have no deterministic twin
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotune once
    set_value_checks(value_checks_wanted(fast, device))


def step_ranks(world_size: int) -> Ranks | None:
    """With several ranks, the collectives that make a rank's step the step of the global batch."""
    return Ranks(world_size, sum_over_ranks, gather_rows) if world_size > 1 else None


def freeze_projection(student: nn.Module) -> None:
    """Source-only training and dsp.mmd_weight 0 drop the MMD features: no gradient reaches the projection (the
    optimizer skips it; it stays in the checkpoints).
    Frozen, it needs no DDP hook and no find_unused_parameters traversal (its cost, and its warning)."""
    inner = unwrap(student)
    root = getattr(inner, "param_roots", (None, None, PROJECTION_ROOT))[2]
    for p in inner.get_submodule(root).parameters():
        p.requires_grad_(False)


class Trainer:
    """One model's fast training, stepped in place. `resume`: (path, checkpoint read and checked by find_checkpoints);
    `run_dir`: where checkpoints go ('' for a benchmark); `log`: a FastRunLog on rank 0, else NullLog. `models`:
    (student, teacher) built by the caller in their memory format (the memory prediction's fake-tensor models)."""

    def __init__(self, cfg: Config, info: DistInfo, data_dirs: tuple[str, str], run_dir: str = "",
                 log: Any = None, resume: tuple[str, dict[str, Any]] | None = None,
                 say: Callable[[str], None] | None = None, models: tuple[nn.Module, nn.Module] | None = None
                 ) -> None:
        self.cfg, self.info, self.data_dirs, self.run_dir = cfg, info, data_dirs, run_dir
        self.log = NullLog() if log is None else log
        self._say = say
        device, fast = info.device, cfg.fast
        self.batch = per_rank_batch(cfg.data.batch_size, info.world_size)
        self.backend = resolve_backend(fast, info)
        self.images_per_step = cfg.dsp.batches_per_step() * cfg.data.batch_size  # the global batch
        self.student, self.teacher = build_models(cfg, device) if models is None else models
        if info.enabled:  # BN statistics over the global batch, the teacher's too (docs/distributed.md)
            convert_global_bn(self.student, device)
            convert_global_bn(self.teacher, device)
        if fast.batched_student:  # after convert_global_bn: per-group statistics over ranks too
            apply_group_bn(self.student, self.batch)
        if fast.channels_last and models is None:
            apply_channels_last(self.student, self.teacher)
        apply_fused_bn(fast.fused_bn, info, self.say, self.student, self.teacher)
        self.optimizer, device_skip = build_optimizer(cfg, self.student, fast, device)
        dtype = amp_dtype(fast, device)
        scaler = build_grad_scaler(dtype, device)
        # the step's random choices: a stream per rank, apart from model init
        self.gen = torch.Generator(device=device).manual_seed(1_000_003 * (info.rank + 1) + cfg.train.seed)
        self.graphs = graphs_on(fast, device)
        self.step_index, self.best_miou, self.skipped_total = 0, -math.inf, 0
        self.ctx: StepContext | None = None
        self._scaler = scaler
        if resume is not None:
            self.load_state_dict(resume[1])
        if not cfg.dsp.enabled or not cfg.dsp.mmd_weight:
            freeze_projection(self.student)
        ddp = apply_ddp(self.student, info, find_unused=False)
        self.ctx = StepContext(cfg, ddp, self.teacher, self.optimizer,
                               make_normalize(self.student.input_kind, device), dtype, scaler,
                               device_skip, sync_flag=info.enabled, autocast_cache=not self.graphs,
                               ranks=step_ranks(info.world_size))
        self.ctx.compiled_losses = apply_compile(fast.compile, self.student, self.teacher)
        if resume is not None:
            self.ctx.counts[2].fill_(int(resume[1]["consecutive_skipped"]))
            self.say(f"resumed from {resume[0]} at step {self.step_index}")
        self.loader = None  # built on the first step, from the step reached (the loader is step-indexed)
        self.buf: StepBuffers | None = None
        self.step_fn: Callable[[], None] | None = None

    @property
    def warmup_steps(self) -> int:
        """Steps before the graph replays (its eager warm-up and the capture step); 0 when graphs are off."""
        return self.cfg.fast.graph_warmup + 1 if self.graphs else 0

    def say(self, msg: str) -> None:
        if self._say is not None:
            self._say(msg)
        elif self.info.is_main:
            print(msg, flush=True)

    @contextlib.contextmanager
    def backends(self) -> Iterator[None]:
        """`configure_backends` for the span of the block, restored after: a benchmark that alternates trainers in
        one process gives each the switches its own run would set."""
        saved = (torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled(),
                 torch.is_deterministic_algorithms_warn_only_enabled(), kernel_flags._value_checks,
                 torch.get_num_threads())
        torch.backends.cudnn.benchmark = False
        configure_backends(self.cfg.fast, self.info.device)
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = saved[0]
            torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
            set_value_checks(saved[3])
            torch.set_num_threads(saved[4])

    def step(self) -> float:
        """One training step (at self.step_index, then advanced); returns the seconds blocked on the loader (the
        copy into the static buffers and the device-side choices count as compute)."""
        cfg = self.cfg
        if self.loader is None:
            self.loader = build_step_loader(cfg, self.info, self.data_dirs, self.step_index, self.batch, self.backend)
            self._say_held_sets(self.loader.in_memory)
        t0 = time.perf_counter()
        batch = next(self.loader)
        wait = time.perf_counter() - t0
        if self.buf is None:
            self.buf = buf = StepBuffers.like(batch, cfg.model.num_classes, cfg.fast.channels_last,
                                              cfg.dsp.paste_ignore_label)
            ctx = self.ctx
            self.step_fn = (GraphedStep(lambda: train_step(ctx, buf), cfg.fast.graph_warmup, self.say)
                            if self.graphs else lambda: train_step(ctx, buf))
        self.buf.load_(batch)
        draw_choices_(self.buf.choices, self.gen, cfg.dsp)
        self.ctx.set_schedule_(self.step_index, scheduled_lr(cfg.optim, self.step_index, cfg.train.max_steps))
        self.step_fn()
        self.step_index += 1
        return wait

    def _say_held_sets(self, in_memory: dict[str, str]) -> None:
        """One line on which prepared sets the torch backend holds decoded (none said with the budget at 0)."""
        mib, held = self.cfg.fast.data_cache_mib, [n for n, why in in_memory.items() if why == "held"]
        if held:
            self.say(f"data: {', '.join(held)} decoded once and held in memory (fast.data_cache_mib {mib})")
        if mib and len(held) < len(in_memory):
            self.say(f"data: decoded at each read, over fast.data_cache_mib {mib}: "
                     + "; ".join(f"{n} ({why})" for n, why in in_memory.items() if why != "held"))

    def state_dict(self, all_ranks: bool = True) -> dict[str, Any]:
        """The checkpoint payload at the step reached. all_ranks: every rank hands over its RNG states (a
        collective: call it on every rank); otherwise this rank's only (best.pt: not for an exact resume)."""
        rng = ckpt_io.rng_state(self.gen)
        rng_all = gather_objects(rng, self.info) if all_ranks else [rng]
        # skipped steps not yet folded in by a log step count too (a resumed run starts with none pending)
        pending, consecutive = (int(v) for v in self.ctx.counts[1:].tolist())
        return {"format": ckpt_io.FORMAT, "step": self.step_index, "student": self.student.state_dict(),
                "teacher": self.teacher.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self._scaler.state_dict(), "rng": rng_all, "world_size": self.info.world_size,
                "skipped_steps": self.skipped_total + pending, "consecutive_skipped": consecutive,
                "best_miou": self.best_miou, "config": self.cfg.to_dict(),
                "input_kind": getattr(self.student, "input_kind", "torchvision")}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Restore a checkpoint of this run. The constructor calls it before DDP wraps the student (the module's
        own parameters are the ones restored either way)."""
        self.student.load_state_dict(ckpt["student"])
        self.teacher.load_state_dict(ckpt["teacher"])
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for g, lr in zip(self.optimizer.param_groups, lrs):  # keep our device lr tensors (the step fills them)
            g["lr"] = lr
        if ckpt.get("scaler"):
            self._scaler.load_state_dict(ckpt["scaler"])
        self._restore_rng(ckpt["rng"], int(ckpt["step"]))
        self.step_index, self.best_miou = int(ckpt["step"]), float(ckpt["best_miou"])
        self.skipped_total = int(ckpt["skipped_steps"])
        if self.ctx is not None:  # the constructor fills it once the step context exists
            self.ctx.counts[2].fill_(int(ckpt["consecutive_skipped"]))

    def _restore_rng(self, rng: list[Any], step: int) -> None:
        info = self.info
        if len(rng) == info.world_size:
            ckpt_io.restore_rng_state(rng[info.rank], self.gen)
            return
        # another world size: the data shards differ anyway; continue, but not bit for bit
        self.gen.manual_seed(self.cfg.train.seed + 7919 * (step + 1) + info.rank)
        if info.is_main:
            print(f"resume: the checkpoint has {len(rng)} ranks, this run {info.world_size}: RNG streams reseeded, "
                  "the run continues but not bit for bit", flush=True)

    def close_loader(self) -> None:
        """Stop the loader (its threads and workers) once the steps are done; a later step() builds a new one."""
        if self.loader is not None:
            with contextlib.suppress(Exception):
                self.loader.close()
            self.loader = None

    def close(self) -> None:
        """The loader first, then the DDP wrapper before any process-group teardown (gloo aborts at exit
        otherwise), even while a traceback still holds frames that reference the step context."""
        self.close_loader()
        if self.ctx is not None:
            self.ctx.student = None  # type: ignore[assignment]
        self.ctx = None
        self.step_fn = self.buf = None
        gc.collect()
        if self.info.device.type == "cuda":
            torch.cuda.empty_cache()
