"""Where a benchmark figure came from and how it is written to bench/results/: every result file is a JSON object
whose `env` says where and how the figures were made, beside the benchmark's own figures.

    {"schema": "dsp_fast.bench/1", "env": {"device": ..., "date": ..., "git_sha": ..., "command": ..., "torch": ...,
     "triton": ..., "python": ..., <the benchmark's own provenance>}, <the benchmark's figures>}
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
from typing import Any

import torch
from PIL import Image, ImageDraw

from dsp_fast.atomic_io import atomic_write
from dsp_fast.config.overrides import split_overrides

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SCHEMA = "dsp_fast.bench/1"


def version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return None


def environment(device: str) -> dict[str, str]:
    """Date, git sha, the device's name and the versions that change a figure."""
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
            "device": name, "torch": torch.__version__, "triton": version("triton") or "not installed",
            "python": platform.python_version()}


def tool_parser(module: str, doc: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])


def parse_args(p: argparse.ArgumentParser, argv: list[str] | None, overrides: bool = False) -> argparse.Namespace:
    """A tool's flags; with `overrides`, its `section.field=value` words (anywhere on the line) go to
    args.overrides. args.command is the command line that made the figures."""
    argv = sys.argv[1:] if argv is None else argv
    flags, rest = split_overrides(argv) if overrides else (argv, [])
    args = p.parse_args(flags)
    args.command, args.overrides = " ".join([p.prog, *argv]), rest
    return args


def result_env(device: str, command: str, **extra: Any) -> dict[str, Any]:
    return {**environment(device), "command": command, **extra}


def stamped(out: str, stem: str, tag: str = "") -> str:
    """out/stem_<date>_<time>[_tag], without an extension."""
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    return os.path.join(out, f"{stem}_{stamp}{'_' + tag if tag else ''}")


def write_result(path: str, result: dict[str, Any]) -> str:
    """`result` (with an `env` from result_env) as JSON with the schema tag, written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return atomic_write(path, json.dumps({"schema": SCHEMA, **result}, indent=1, default=str))


def bar_chart(path: str, title: list[str], bars: list[tuple[str, float | None, str, str]]) -> None:
    """A PNG of horizontal bars drawn with PIL (matplotlib is not installed on the CPU machine): `title` lines, then
    one (label, value or None, note, colour) per bar, the note beside it."""
    left, width, bar_h, top = 230, 520, 26, 16 + 18 * len(title)
    img = Image.new("RGB", (left + width + 260, top + 36 * len(bars) + 10), "white")
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(title):
        draw.text((10, 10 + 18 * i), line, fill="black")
    vmax = max((v for _, v, _, _ in bars if v), default=1.0)
    for i, (label, value, note, colour) in enumerate(bars):
        y = top + 36 * i
        draw.text((10, y + 8), label[:36], fill="black")
        end = left + max(4, int(width * (value or 0) / vmax))
        draw.rectangle([left, y, end, y + bar_h], fill=colour)
        draw.text((end + 6, y + 8), note, fill="black")
    img.save(path)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))
