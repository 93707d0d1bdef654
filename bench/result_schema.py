"""The one shape of a benchmark result file: a JSON object whose `env` says where and how the figures were made
(device, date, git sha, command, torch / triton / python versions), beside the benchmark's own figures.

    {"schema": "dsp_fast.bench/1", "env": {"device": ..., "date": ..., "git_sha": ..., "command": ..., "torch": ...,
     "triton": ..., "python": ..., <the benchmark's own provenance>}, <the benchmark's figures>}

Used by bench.throughput, bench.profile_step and bench.gloo_latency.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from bench._env import environment

SCHEMA = "dsp_fast.bench/1"
REQUIRED_ENV = ("device", "date", "git_sha", "command", "torch", "triton")


def command_line(prog: str, argv: list[str] | None = None) -> str:
    """The command that made the figures: `prog` and this process's arguments (or `argv`)."""
    return " ".join([prog, *(sys.argv[1:] if argv is None else argv)])


def result_env(device: str, command: str, **extra: Any) -> dict[str, Any]:
    """The `env` of a result: bench._env.environment (date, git sha, device, versions), the command, and `extra`."""
    return {**environment(device), "command": command, **extra}


def write_result(path: str, result: dict[str, Any]) -> str:
    """Write `result` (which must carry an `env` from result_env) as JSON with the schema tag: whole to a temporary
    name, then renamed, so a kill mid-write never leaves half a file. Returns the path."""
    missing = [k for k in REQUIRED_ENV if k not in result.get("env", {})]
    if missing:
        raise ValueError(f"write_result: result['env'] lacks {missing} (build it with result_env)")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"schema": SCHEMA, **result}, f, indent=1, default=str)
    os.replace(path + ".tmp", path)
    return path
