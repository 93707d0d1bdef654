"""The two trainers of the throughput comparison, built once and stepped in place: `ReferenceTrainer` (the naive
trainer's `build_run`, `next_batch` and `train_step`) and `FastBench` (the engine's `Trainer` itself), plus the timer.
Each step returns its data wait as its own training loop logs it: the reference's three DataLoader `next()` calls,
`draw_choices` (long-tail crops decoded on the main thread) and the host-to-device copies; the fast step loader's
`next()` only (the copy into the static buffers and the device-side choices are compute). Process-wide switches each
trainer's own run would set are applied only while that trainer steps (`flags()`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import time
from collections.abc import Callable, Iterator

import torch

from bench.provenance import sync
from dsp_fast import reference as ref
from dsp_fast.config import Config
from dsp_fast.engine.distributed import DistInfo
from dsp_fast.engine.step import read_stats
from dsp_fast.engine.trainer import Trainer
from dsp_fast.kernels import force_twins


class ReferenceTrainer:
    """dsp_fast.reference's run (`build_run`) stepped one step at a time, with its own data and step functions."""

    name = "reference"

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.run = ref.build_run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=device.type)))
        self.images_per_step = cfg.dsp.batches_per_step() * cfg.data.batch_size
        self.step_index = 0
        self.last_loss = float("nan")

    @contextlib.contextmanager
    def flags(self) -> Iterator[None]:
        """A standalone reference run sets no backend switch: cuDNN default (no autotuning)."""
        saved = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = False
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = saved

    def step(self) -> float:
        """One reference step; returns the data time as reference.train logs it."""
        r = self.run
        t_data = time.perf_counter()
        batch, choices = ref.next_batch(r)
        data_s = time.perf_counter() - t_data
        losses = ref.train_step(self.cfg, r.student, r.teacher, r.optimizer, self.step_index, batch, choices)
        self.last_loss = losses["loss"]
        self.step_index += 1
        return data_s

    def check(self) -> None:
        if not math.isfinite(self.last_loss):
            raise FloatingPointError(f"reference trainer: non-finite loss at step {self.step_index}")

    def close(self) -> None:
        self.run = None  # type: ignore[assignment]  # drops the loaders
        gc.collect()


class FastBench:
    """The engine's `Trainer` (the object `python -m dsp_fast.train` runs) as the comparison times it: `step` is
    `Trainer.step`, `flags()` its `backends()` (plus the twins of the "fused kernels off" variant)."""

    def __init__(self, trainer: Trainer, name: str = "fast", twins: bool = False) -> None:
        self.trainer, self.name, self.twins = trainer, name, twins
        self.device = trainer.info.device
        self.images_per_step = trainer.images_per_step
        self.extra_warmup = trainer.warmup_steps  # the graph's eager warm-up and the capture step
        self.step = trainer.step  # returns the time blocked on the loader

    @contextlib.contextmanager
    def flags(self) -> Iterator[None]:
        with self.trainer.backends(), force_twins(self.twins):
            yield

    def check(self) -> None:
        """One host read (outside the timed region): the steps so far were finite, as the loop's guard checks."""
        means, skipped, _ = read_stats(self.trainer.ctx)
        if skipped:
            raise FloatingPointError(f"{self.name}: {skipped} steps had a non-finite loss or gradient ({means})")

    def close(self) -> None:
        self.trainer.close()


def build_fast(cfg: Config, info: DistInfo, data_dirs: tuple[str, str], name: str = "fast", twins: bool = False,
               say: Callable[[str], None] = print) -> FastBench:
    return FastBench(Trainer(cfg, info, data_dirs, say=say), name, twins)


def warm_up(trainer, steps: int) -> None:
    with trainer.flags():
        for _ in range(steps):
            trainer.step()
        sync(str(trainer.device))
    trainer.check()


def time_steps(trainer, steps: int, barrier: Callable[[], None] = lambda: None) -> dict[str, float | None]:
    """n steps between device synchronizes; data wait is the sum of what step() reports, compute the rest; the
    CUDA allocator's peak (None on CPU)."""
    cuda = trainer.device.type == "cuda"
    with trainer.flags():
        sync(str(trainer.device))
        barrier()
        if cuda:
            torch.cuda.reset_peak_memory_stats(trainer.device)
        t0 = time.perf_counter()
        data = sum(trainer.step() for _ in range(steps))
        sync(str(trainer.device))
        total = time.perf_counter() - t0
    trainer.check()
    return {"steps_per_s": steps / total, "images_per_s": steps * trainer.images_per_step / total,
            "ms_per_step": 1e3 * total / steps, "data_ms": 1e3 * data / steps,
            "compute_ms": 1e3 * (total - data) / steps,
            "peak_gib": torch.cuda.max_memory_allocated(trainer.device) / 2**30 if cuda else None}
