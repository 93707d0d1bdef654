"""Where a benchmark figure came from and how it is written to bench/results/: every result file is a JSON object
whose `env` says where and how the figures were made, beside the benchmark's own figures.

    {"schema": "dsp_fast.bench/1", "env": {"device": ..., "date": ..., "git_sha": ..., "command": ..., "torch": ...,
     "triton": ..., "python": ..., <the benchmark's own provenance>}, <the benchmark's figures>}
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SCHEMA = "dsp_fast.bench/1"


def environment(device: str) -> dict[str, str]:
    """Date, git sha, the device's name and the versions that change a figure."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(RESULTS_DIR), capture_output=True,
                             text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        sha = "unknown"
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()} (torch threads " \
               f"{torch.get_num_threads()})"
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "git_sha": sha,
            "device": name, "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version()}


def command_line(prog: str, argv: list[str] | None = None) -> str:
    """The command that made the figures: `prog` and this process's arguments (or `argv`)."""
    return " ".join([prog, *(sys.argv[1:] if argv is None else argv)])


def result_env(device: str, command: str, **extra: Any) -> dict[str, Any]:
    return {**environment(device), "command": command, **extra}


def write_result(path: str, result: dict[str, Any]) -> str:
    """`result` (with an `env` from result_env) as JSON with the schema tag: whole to a temporary name, then
    renamed, so a kill mid-write never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"schema": SCHEMA, **result}, f, indent=1, default=str)
    os.replace(path + ".tmp", path)
    return path


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def copy_bandwidth_gbs(device: str, nbytes: int = 256 * 2**20, repeats: int = 10) -> float:
    """Measured device copy bandwidth (bytes read + written per second / 1e9): the ceiling a memory-bound kernel
    is compared against."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):  # the first copy warms up
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def append_csv(name: str, row: dict[str, object]) -> str:
    """Append one row to bench/results/<name>; writes the header when the file is new."""
    path = os.path.join(RESULTS_DIR, name)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
    return path


def timed(fn: Callable[[], object], device: str) -> Callable[[], object]:
    """fn followed by a device sync, so that a wall-clock timer sees the whole kernel."""

    def run() -> object:
        out = fn()
        sync(device)
        return out

    return run
