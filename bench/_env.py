"""Where a benchmark figure came from (git sha, device, versions, date) and how it is written to bench/results/."""

from __future__ import annotations

import csv
import datetime
import os
import platform
import subprocess
import time
from collections.abc import Callable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(RESULTS_DIR), capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu} x{os.cpu_count()} (torch threads {torch.get_num_threads()})"


def environment(device: str) -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
    }


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth_gbs(device: str, nbytes: int = 256 * 2**20, repeats: int = 10) -> float:
    """Measured device copy bandwidth (bytes read + written per second / 1e9): the ceiling a memory-bound kernel
    is compared against."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def append_csv(name: str, row: dict[str, object]) -> str:
    """Append one row to bench/results/<name>; writes the header when the file is new."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
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
