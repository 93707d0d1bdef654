"""The run folder: resolved config, a progress line with img/s and ETA, metrics as JSONL, atomic checkpoints."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch

from dsp_fast.config import Config, save_config


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train.device is 'cuda' but torch sees no GPU (use 'auto' or 'cpu')")
    return torch.device(name)


def atomic_torch_save(obj: Any, path: str) -> None:
    """Write to a temporary file and rename, so a kill mid-write never leaves a truncated checkpoint."""
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(path: str, student: torch.nn.Module, teacher: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, step: int, cfg: Config) -> None:
    atomic_torch_save({"student": student.state_dict(), "teacher": teacher.state_dict(),
                       "optimizer": optimizer.state_dict(), "step": step, "config": cfg.to_dict(),
                       "input_kind": getattr(student, "input_kind", "torchvision")}, path)


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class RunLog:
    """Owns one run folder (`train.out_dir[/sub]`): config.yaml, metrics.jsonl and the progress line."""

    def __init__(self, cfg: Config, sub: str = "", title: str = "train"):
        self.dir = os.path.join(cfg.train.out_dir, sub) if sub else cfg.train.out_dir
        os.makedirs(self.dir, exist_ok=True)
        save_config(cfg, self.path("config.yaml"))
        self.every = cfg.train.log_every
        self.title = title
        self._file = open(self.path("metrics.jsonl"), "a")
        self._sums: dict[str, float] = {}
        self._count = 0
        self._data_s = 0.0

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def start(self, total_steps: int, images_per_step: int, start_step: int = 0) -> None:
        """Begin timing; a resumed run passes the step it continues from, so img/s and ETA stay right."""
        self.total, self.images_per_step = total_steps, images_per_step
        self._t_start = self._t_last = time.perf_counter()
        self._steps_at_last = start_step

    def step(self, step: int, losses: dict[str, float], data_s: float = 0.0) -> None:
        """Accumulate one step; every `log_every` steps (and at the last) print and write the averages."""
        for k, v in losses.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._count += 1
        self._data_s += data_s
        if not (self.every and (step % self.every == 0 or step == self.total)):
            return
        now = time.perf_counter()
        elapsed = now - self._t_last
        steps = step - self._steps_at_last
        img_s = steps * self.images_per_step / max(elapsed, 1e-9)
        eta = (self.total - step) * elapsed / max(steps, 1)
        means = {k: v / self._count for k, v in self._sums.items()}
        record = {"step": step, **means, "img_per_s": img_s, "step_ms": 1000 * elapsed / max(steps, 1),
                  "data_wait_pct": 100 * self._data_s / max(elapsed, 1e-9)}
        if torch.cuda.is_available():
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        terms = " ".join(f"{k} {v:.4f}" for k, v in means.items())
        mem = f" | peak {record['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in record else ""
        print(f"[{self.title}] step {step}/{self.total} | {terms} | {img_s:.1f} img/s | "
              f"data {record['data_wait_pct']:.0f}% | ETA {_fmt_time(eta)}{mem}", flush=True)
        self._write(record)
        self._sums, self._count, self._data_s = {}, 0, 0.0
        self._t_last, self._steps_at_last = now, step

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self._write({"step": step, **values})

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
