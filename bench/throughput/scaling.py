"""Scaling of the fast trainer: timed steps on 1 and on N processes (torchrun; gloo on CPU, NCCL on CUDA with one
GPU per process), efficiency = img/s(N) / (N x img/s(1)), where img/s counts every rank's crops. Two N-process
runs: strong scaling keeps the global batch (data.batch_size, the paper's setting: each rank takes batch/N) and weak
scaling keeps the per-rank batch (global batch N x batch). Both are measured against the 1-process run at
data.batch_size.

The parent (`run_scaling`, called by bench/throughput/compare.py) writes the resolved config (its `fast:` section
holds the fast trainer's options and the prepared folders) to a spec file and launches `torchrun -m
bench.throughput.scaling --worker SPEC --result OUT` once per world size; every rank builds the engine's Trainer
(DDP when N > 1) on the prepared data of the parent, warms up, and times `rounds` regions of `steps` steps (a
barrier before each); rank 0 writes the figures.
On CPU each process gets cpu_count // N threads in both runs (OMP_NUM_THREADS), so the 1-process baseline does not
get more cores than one of the N processes: the figure is per-process parallel efficiency, not core scaling.
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
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_scaling(args, cfg, dirs: tuple[str, str], device: torch.device, say) -> dict:
    n = args.scaling
    if device.type == "cuda" and torch.cuda.device_count() < n:
        reason = (f"skipped: {torch.cuda.device_count()} GPU(s) here, NCCL needs one GPU per process "
                  f"({n} processes)")
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
            spec = os.path.join(tmp, f"spec_{key}.yaml")
            run_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=batch), fast=fast)
            with open(spec, "w") as f:
                yaml.safe_dump({"config": _plain(run_cfg.to_dict()), "device": device.type, "rounds": args.rounds,
                                "steps": args.steps, "warmup": args.warmup}, f)
            say(f"[scaling] {key}: {world} process(es), global batch {batch}, {threads} thread(s) each: torchrun")
            result = os.path.join(tmp, f"{key}.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                   "-m", "bench.throughput.scaling", "--worker", spec, "--result", result]
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                                      timeout=args.scaling_timeout)
                rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-2000:]
            except subprocess.TimeoutExpired:
                rc, tail = 124, f"timed out after {args.scaling_timeout} s"
            if rc != 0 or not os.path.exists(result):
                say(f"[scaling] {key} ({world} processes) failed (exit {rc}):\n{tail}")
                return {**out, "status": "failed", "exit_code": rc, "log_tail": tail}
            with open(result) as f:
                out["runs"][key] = {**json.load(f), "global_batch": batch}
            out["runs"][key]["wall_s"] = time.perf_counter() - t0
            say(f"[scaling] {key}: {out['runs'][key]['images_per_s']:.2f} img/s (all ranks)")
    one = out["runs"]["1"]["images_per_s"]
    for key in ("strong", "weak"):
        out[f"{key}_efficiency"] = out["runs"][key]["images_per_s"] / (n * one)
        out[f"{key}_speedup"] = out["runs"][key]["images_per_s"] / one
    return out


def _plain(obj):
    """Tuples to lists, so that yaml.safe_dump writes what load_config reads back."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def worker(spec_path: str, result_path: str) -> int:
    from bench.throughput.trainers import build_fast, time_steps, warm_up
    from dsp_fast.config import load_config
    from dsp_fast.engine.distributed import barrier, init_distributed, teardown

    with open(spec_path) as f:
        spec = yaml.safe_load(f)
    tmp_cfg = result_path + f".{os.environ.get('RANK', '0')}.yaml"
    with open(tmp_cfg, "w") as f:
        yaml.safe_dump(spec["config"], f)
    cfg = load_config(tmp_cfg)
    info = init_distributed(torch.device(spec["device"]))
    fast = None
    try:
        dirs = (cfg.fast.prepared_source, cfg.fast.prepared_target)
        fast = build_fast(cfg, info, dirs, say=lambda m: print(m, flush=True) if info.is_main else None)
        warm_up(fast, spec["warmup"] + fast.extra_warmup)
        rows = [time_steps(fast, spec["steps"], barrier=lambda: barrier(info)).row(fast.images_per_step)
                for _ in range(spec["rounds"])]
        if info.is_main:
            med = {k: statistics.median(r[k] for r in rows) for k in ("images_per_s", "steps_per_s", "ms_per_step",
                                                                       "data_ms", "compute_ms")}
            with open(result_path, "w") as f:
                json.dump({**med, "world_size": info.world_size, "torch_threads": torch.get_num_threads(),
                           "rounds": rows}, f, indent=1)
    finally:
        if fast is not None:
            fast.close()  # drops the DDP wrapper before the process group goes (gloo aborts at exit otherwise)
        del fast
        teardown(info)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m bench.throughput.scaling", description=__doc__.split("\n")[0])
    p.add_argument("--worker", required=True, help="spec file written by run_scaling")
    p.add_argument("--result", required=True)
    a = p.parse_args()
    sys.exit(worker(a.worker, a.result))
