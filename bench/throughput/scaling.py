"""Scaling of the fast trainer: timed steps on 1 and on N processes (torchrun; gloo on CPU, NCCL on CUDA with one
GPU per process), efficiency = img/s(N) / (N x img/s(1)), img/s over every rank. Strong scaling keeps the global batch
(data.batch_size, the paper's setting), weak scaling the per-rank batch; both against 1 process at data.batch_size.
Every rank builds the engine's Trainer (DDP when N > 1) from the resolved config `run_scaling` writes, warms up and
times `rounds` regions of `steps` steps, a barrier before each. On CPU each process gets cpu_count // N threads in
every run, so the figure is per-process parallel efficiency, not core scaling.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from dsp_fast.config import save_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 600


def run_scaling(args: argparse.Namespace, cfg, dirs: tuple[str, str], device: torch.device, say) -> dict:
    n = args.scaling
    if device.type == "cuda" and torch.cuda.device_count() < n:
        reason = f"skipped: {torch.cuda.device_count()} GPU(s) here, NCCL needs one GPU per process ({n} processes)"
        say(f"[scaling] {reason}")
        return {"status": "skipped", "reason": reason}
    threads = max(1, (os.cpu_count() or 1) // n) if device.type == "cpu" else int(os.environ.get("OMP_NUM_THREADS",
                                                                                                  "4"))
    fast = dataclasses.replace(cfg.fast, prepared_source=dirs[0], prepared_target=dirs[1])
    out: dict = {"status": "measured", "backend": "nccl" if device.type == "cuda" else "gloo",
                 "threads_per_process": threads, "processes": n, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="dsp_throughput_scaling_") as tmp:
        b = cfg.data.batch_size
        for key, world, batch in (("1", 1, b), ("strong", n, b), ("weak", n, n * b)):
            config, result = os.path.join(tmp, f"{key}.yaml"), os.path.join(tmp, f"{key}.json")
            save_config(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=batch), fast=fast),
                        config)
            say(f"[scaling] {key}: {world} process(es), global batch {batch}, {threads} thread(s) each: torchrun")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", "-m",
                   "bench.throughput.scaling", config, result, device.type, str(args.rounds), str(args.steps),
                   str(args.warmup)]
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS=str(threads)),
                                      capture_output=True, text=True, timeout=TIMEOUT_S)
                rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-2000:]
            except subprocess.TimeoutExpired:
                rc, tail = 124, f"timed out after {TIMEOUT_S} s"
            if rc != 0 or not os.path.exists(result):
                say(f"[scaling] {key} ({world} processes) failed (exit {rc}):\n{tail}")
                return {**out, "status": "failed", "exit_code": rc, "log_tail": tail}
            with open(result) as f:
                out["runs"][key] = {**json.load(f), "global_batch": batch, "wall_s": time.perf_counter() - t0}
            say(f"[scaling] {key}: {out['runs'][key]['images_per_s']:.2f} img/s (all ranks)")
    one = out["runs"]["1"]["images_per_s"]
    for key in ("strong", "weak"):
        out[f"{key}_efficiency"] = out["runs"][key]["images_per_s"] / (n * one)
        out[f"{key}_speedup"] = out["runs"][key]["images_per_s"] / one
    return out


def worker(config: str, result: str, device: str, rounds: int, steps: int, warmup: int) -> int:
    from bench.throughput.trainers import build_fast, time_steps, warm_up
    from dsp_fast.config import load_config
    from dsp_fast.engine.distributed import barrier, init_distributed, teardown

    cfg = load_config(config)
    info = init_distributed(torch.device(device))
    fast = None
    try:
        dirs = (cfg.fast.prepared_source, cfg.fast.prepared_target)
        fast = build_fast(cfg, info, dirs, say=lambda m: print(m, flush=True) if info.is_main else None)
        warm_up(fast, warmup + fast.extra_warmup)
        rows = [time_steps(fast, steps, barrier=lambda: barrier(info)) for _ in range(rounds)]
        if info.is_main:
            med = {k: statistics.median(r[k] for r in rows) for k in ("images_per_s", "steps_per_s", "ms_per_step",
                                                                       "data_ms", "compute_ms")}
            with open(result, "w") as f:
                json.dump({**med, "world_size": info.world_size, "torch_threads": torch.get_num_threads(),
                           "rounds": rows}, f, indent=1)
    finally:
        if fast is not None:
            fast.close()  # drops the DDP wrapper before the process group goes (gloo aborts at exit otherwise)
        del fast
        teardown(info)
    return 0


if __name__ == "__main__":  # a torchrun worker of run_scaling: CONFIG RESULT DEVICE ROUNDS STEPS WARMUP
    a = sys.argv[1:]
    sys.exit(worker(a[0], a[1], a[2], *map(int, a[3:6])))
