"""What a run folder holds: its provenance (provenance.json: git sha, versions, device, command), the resolved
config, a progress line with img/s and ETA, metrics as JSONL, the final IoU figures (metrics.jsonl and
summary.json). Which folder a run gets, and which one `--resume` continues, is dsp_fast/resume.py's.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Any

import torch

from dsp_fast.checkpoint_file import (  # noqa: F401 - re-exported: the reference writes its files through run_io
    EXIT_WRITE_FAILED,
    RunWriteError,
    atomic_torch_save,
    atomic_write_text,
    data_write_error,
    write_error,
)
from dsp_fast.config import Config, ConfigError, save_config
from dsp_fast.data.labels import class_names

PROVENANCE = "provenance.json"

# weight of the newest log interval in the moving average of the step time behind the ETA (a loaded machine makes
# single intervals jump; the average follows a lasting change within a few intervals)
ETA_SMOOTHING = 0.2


def iou_record(iou: torch.Tensor) -> dict[str, Any]:
    """The final figures as JSON: per-class IoU by name (null: class neither in the labels nor predicted), the
    mIoU, and over how many classes it averages."""
    values = iou.tolist()
    present = [v for v in values if not math.isnan(v)]
    return {"mIoU": sum(present) / len(present) if present else None, "classes_evaluated": len(present),
            "num_classes": len(values),
            "iou": {name: (None if math.isnan(v) else v) for name, v in zip(class_names(len(values)), values)}}


def final_record(iou: torch.Tensor, teacher_iou: torch.Tensor | None = None) -> dict[str, Any]:
    """The final figures of one model: the student's (`iou_record`; the model scored, as the authors report) and,
    when given, its mean teacher's as `teacher_mIoU`, `teacher_classes_evaluated`, `teacher_iou`."""
    record = {**iou_record(iou), "scored": "student"}
    if teacher_iou is not None:
        record.update({f"teacher_{k}": v for k, v in iou_record(teacher_iou).items() if k != "num_classes"})
    return record


def lr_figures(param_groups: list[dict[str, Any]]) -> dict[str, float]:
    """The lr a step ran with, as the metrics record it: `lr` (the backbone's: the schedule's base lr) and, when
    optim.head_lr_mult makes it differ, `lr_head` (the classifier's). A device lr is read here: call it on log steps
    only."""
    first = {}
    for g in param_groups:
        first.setdefault(g["name"].split("_", 1)[0], g["lr"])
    lr, head = float(first["backbone"]), float(first.get("classifier", first["backbone"]))
    return {"lr": lr} if head == lr else {"lr": lr, "lr_head": head}


def _pct(value: float | None) -> str:
    return "  n/a" if value is None or math.isnan(value) else f"{100 * value:5.1f}"


def format_final_report(name: str, steps: int, iou: torch.Tensor, teacher_iou: torch.Tensor | None,
                        table: str) -> str:
    """One model's final block: the student's IoU table (`table`, evaluate.format_iou_table of `iou`), then the
    teacher's mIoU."""
    text = f"\n[{name}] target IoU of the student after {steps} steps (the model scored, as the authors report):\n"
    text += table
    if teacher_iou is not None:
        t = iou_record(teacher_iou)
        text += (f"\nteacher (the student's EMA) mIoU{len(teacher_iou)} {_pct(t['mIoU'])}  (over "
                 f"{t['classes_evaluated']} of {len(teacher_iou)} classes)")
    return text + "\n"


def format_final_table(models: dict[str, dict[str, Any]], num_classes: int) -> str:
    """The closing table of a run: each model's student mIoU (the figure reported) and its teacher's."""
    lines = [f"{'model':<16}{'student mIoU (reported)':<33}teacher mIoU"]
    for name, r in models.items():
        row = f"{name:<16}{_pct(r['mIoU'])}  (over {r['classes_evaluated']} of {num_classes} classes)"
        if "teacher_mIoU" in r:
            row += f"    {_pct(r['teacher_mIoU'])}  (over {r['teacher_classes_evaluated']} of {num_classes} classes)"
        lines.append(row)
    return "\n".join(lines)


def write_summary(folder: str, summary: dict[str, Any]) -> str:
    """summary.json of a whole run (written atomically); returns its path."""
    return atomic_write_text(os.path.join(folder, "summary.json"), json.dumps(summary, indent=1))


def resolve_device(name: str, field: str = "train.device") -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is a ConfigError naming `field` (the entry
    points print it as `error: ...` and exit 2, as for any bad setting)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{field} is 'cuda' but torch sees no GPU (torch {torch.__version__}; use 'auto' or 'cpu')")
    return torch.device(name)


PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def git_state(folder: str = PACKAGE_DIR) -> dict[str, Any] | str:
    """{'sha', 'dirty'} of the git checkout the code runs from ('dirty': tracked files differ from the commit), or
    'unknown' (no git, or this package is not tracked there: a virtualenv inside another repository)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", folder, *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if not sha or git("ls-files", "--error-unmatch", "__init__.py") is None:
        return "unknown"
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"sha": sha, "dirty": None if status is None else bool(status)}


def _dist_version(*names: str, prefix: str = "") -> str:
    """The installed version of the first distribution named (or, with `prefix`, whose name starts with it), read
    from its metadata without importing it (DALI takes seconds to import); 'not installed' otherwise."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    if prefix:
        for dist in importlib.metadata.distributions():
            if (dist.metadata["Name"] or "").lower().startswith(prefix):
                return f"{dist.metadata['Name']} {dist.version}"
    return "not installed"


def provenance(device: torch.device) -> dict[str, Any]:
    """What produced a run: code (git), libraries, device, the command line and where it ran."""
    if device.type == "cuda":
        described = f"{device} ({torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda})"
    else:
        described = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads " \
                    f"{torch.get_num_threads()})"
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": git_state(), "torch": torch.__version__,
            "triton": _dist_version("triton", "pytorch-triton"),
            "dali": _dist_version(prefix="nvidia-dali"), "python": platform.python_version(),
            "device": described, "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "command": shlex.join(getattr(sys, "orig_argv", sys.argv)), "cwd": os.getcwd(),
            "host": platform.node()}


def write_provenance(folder: str, device: torch.device) -> str:
    """provenance.json in a run folder (written atomically); returns its path. A resumed run keeps the first
    start's record and appends its own to the list under 'resumes' (the code or the device may have changed)."""
    path = os.path.join(folder, PROVENANCE)
    record = provenance(device)
    try:
        with open(path) as f:
            first = json.load(f)
    except (OSError, ValueError):
        first = None
    if isinstance(first, dict):
        record = {**first, "resumes": [*first.get("resumes", []), record]}
    return atomic_write_text(path, json.dumps(record, indent=1))


def _read_records(path: str) -> list[tuple[str, dict[str, Any] | None]]:
    """(line, record) of each line of a metrics.jsonl (None: a line cut by a kill mid-write); [] without the file."""
    if not os.path.isfile(path):
        return []
    out: list[tuple[str, dict[str, Any] | None]] = []
    with open(path) as f:
        for line in f.read().splitlines():
            try:
                out.append((line, json.loads(line)))
            except json.JSONDecodeError:
                out.append((line, None))
    return out


def recorded_seconds(folder: str, step: int) -> float:
    """The training seconds a model's metrics.jsonl in `folder` records up to `step` (the elapsed_s of its last
    progress record at or before it; 0 when none): what earlier starts of a resumed run spent."""
    elapsed = 0.0
    for _, record in _read_records(os.path.join(folder, "metrics.jsonl")):
        if record is not None and record.get("step", 0) <= step:
            elapsed = record.get("elapsed_s", elapsed)
    return elapsed


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class RunLog:
    """Owns one model's folder of a run: config.yaml, metrics.jsonl and the progress line."""

    def __init__(self, cfg: Config, folder: str, title: str = "train", resolved: dict[str, Any] | None = None):
        self.dir = folder
        os.makedirs(self.dir, exist_ok=True)
        save_config(cfg, self.path("config.yaml"), resolved)  # `resolved`: what the run made of 'auto' settings
        self.every = cfg.train.log_every
        self.title = title
        self._file = open(self.path("metrics.jsonl"), "a")
        self._sums: dict[str, float] = {}
        self._count = 0
        self._data_s = 0.0

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def start(self, total_steps: int, images_per_step: int, start_step: int = 0) -> None:
        """Begin timing; a resumed run passes the step it continues from, so img/s and ETA stay right, the records
        of the steps it trains again are dropped (`keep_records_until`), and elapsed_s counts on from the kept
        ones."""
        self.total, self.images_per_step = total_steps, images_per_step
        self._elapsed_before = self.keep_records_until(start_step)
        self._t_start = self._t_last = time.perf_counter()
        self._steps_at_last = start_step
        self._step_s: float | None = None  # moving average of the seconds per step

    def keep_records_until(self, step: int) -> float:
        """Drop the records of metrics.jsonl after `step` (a run killed after its last checkpoint logged steps it
        trains again; kept, every later step would appear twice), rewriting the file atomically; returns the
        training seconds recorded up to `step` (the last kept record's elapsed_s; 0 when none)."""
        path = self.path("metrics.jsonl")
        records = _read_records(path)
        kept = [line for line, record in records if record is not None and record.get("step", 0) <= step]
        if len(kept) < len(records):
            self._file.close()
            atomic_write_text(path, "".join(f"{line}\n" for line in kept))
            self._file = open(path, "a")
            print(f"[{self.title}] {path}: {len(records) - len(kept)} records after step {step} dropped (the steps "
                  "trained again from the checkpoint log anew)", flush=True)
        return recorded_seconds(self.dir, step)

    def step(self, step: int, losses: dict[str, float], data_s: float = 0.0, lr: dict[str, float] | None = None
             ) -> None:
        """Accumulate one step; every `log_every` steps (and at the last) print and write the averages, and `lr`
        (`lr_figures`) as the last step ran it, not averaged."""
        self._lr = lr or {}
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
        step_s = elapsed / max(steps, 1)
        self._step_s = step_s if self._step_s is None else ETA_SMOOTHING * step_s + (1 - ETA_SMOOTHING) * self._step_s
        eta = (self.total - step) * self._step_s
        means = {k: v / self._count for k, v in self._sums.items()}
        record = {"step": step, **means, **self._lr, "img_per_s": img_s, "step_ms": 1000 * elapsed / max(steps, 1),
                  "data_wait_pct": 100 * self._data_s / max(elapsed, 1e-9),
                  "elapsed_s": round(self._elapsed_before + now - self._t_start, 3)}
        if torch.cuda.is_available():
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        terms = " ".join([*(f"{k} {v:.4f}" for k, v in means.items()), *(f"{k} {v:.3g}" for k, v in self._lr.items())])
        mem = f" | peak {record['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in record else ""
        print(f"[{self.title}] step {step}/{self.total} | {terms} | {img_s:.1f} img/s | "
              f"data {record['data_wait_pct']:.0f}% | ETA {_fmt_time(eta)}{mem}", flush=True)
        self._write(record)
        self._sums, self._count, self._data_s = {}, 0, 0.0
        self._t_last, self._steps_at_last = now, step

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self._write({"step": step, **values})

    def final(self, step: int, iou: torch.Tensor, teacher_iou: torch.Tensor | None = None) -> dict[str, Any]:
        """Write the final evaluation (the student's per-class IoU and mIoU, the teacher's too when given) as the
        last record of metrics.jsonl; returns it."""
        record = final_record(iou, teacher_iou)
        self._write({"step": step, "final": True, "eval/mIoU": record["mIoU"], **record})
        return record

    def recorded_final(self, step: int) -> dict[str, Any] | None:
        """The final record metrics.jsonl already holds for `step` (a finished run resumed), else None."""
        found = None
        for _, record in _read_records(self.path("metrics.jsonl")):
            if record is not None and record.get("final") and record.get("step") == step:
                found = record
        if found is None:
            return None
        return {k: v for k, v in found.items() if k not in ("step", "final", "eval/mIoU")}

    def _write(self, record: dict[str, Any]) -> None:
        """Append one record. A failed write (full disk, I/O error) does not stop training (the checkpoints hold the
        run): it is said once, and the log stops there (a half-written buffer would come back as a torn line)."""
        if self._file is None:
            return
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:
            print(f"warning: {write_error(self.path('metrics.jsonl'), e)}; training continues, but metrics from "
                  f"step {record.get('step')} on are printed only, not recorded", file=sys.stderr, flush=True)
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):  # a full disk: the write already said so
                self._file.close()
