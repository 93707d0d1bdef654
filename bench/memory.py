"""Peak device memory of one training step, predicted without a GPU, for every preset: the fast trainer as it runs
on CUDA (autocast dtype, channels_last, CUDA graphs' settings, fused kernels) and the reference trainer (fp32, NCHW,
eager), each split into weights, optimizer state, gradients, activations and the DSP buffers at the peak.

    python -m bench.memory [--config PRESET ...] [--check-cpu] [--measure-cuda] [--out DIR] [section.field=value ...]

The predictions run each trainer's own step on fake tensors (torch's FakeTensorMode: shapes, no storage, seconds
on a CPU): the fast one through dsp_fast.engine.memory_model (its `Trainer`; what it models and what it leaves
out is written there), the reference through bench.memory_steps (its `train_step`). One rank, one device; the
CUDA context (about 0.5 GiB, outside torch's allocator) comes on top of every figure.

--check-cpu [PRESET]: both steps of a preset (default synthetic, at --check-crop 48) also on real CPU tensors,
beside their fake prediction (the kernels as this machine runs them on both sides): live tensor bytes and the CPU
allocator's own peak (tests/test_memory.py holds them to the prediction).
--measure-cuda: both trainers built for real on the GPU and stepped (the fast one past its warm-up and graph
capture), torch.cuda.max_memory_allocated beside the prediction, one `[memory]` line per trainer
(bench/gpu_check.sh copies those lines into its summary).
--out DIR: memory_<date>.json and .md there.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import os
import sys
import time
from typing import Any

import torch

from bench.memory_steps import MIB, check_on_cpu, predict_reference_step, reference_run
from bench.result_schema import command_line, result_env, write_result
from dsp_fast.config import Config, load_config, preset_names
from dsp_fast.config.overrides import split_overrides
from dsp_fast.engine import memory_model as mm
from dsp_fast.engine.distributed import DistInfo
from dsp_fast.engine.trainer import Trainer

TRAINERS = ("fast", "reference")
PHASES = {"activations": "forward", "backward": "backward", "update": "update"}
"""The phase of the step in which the peak was reached, from the category of the allocation that made it."""


def fmt(n_bytes: float) -> str:
    return f"{n_bytes / mm.GIB:.2f} GiB" if n_bytes >= mm.GIB else f"{n_bytes / MIB:.1f} MiB"


def summary(report: mm.MemoryReport) -> dict[str, Any]:
    """A prediction as the results file holds it: GiB per table column and per category at the peak."""
    return {"peak_gib": report.gib(), "columns_gib": {name: report.gib(*cats) for name, cats in mm.TABLE},
            "by_category_gib": {k: v / mm.GIB for k, v in report.at_peak.items()}, "peak_during": report.phase,
            "before_step_gib": report.at_start / mm.GIB, "settings": report.settings}


def predict_preset(name: str, overrides: list[str]) -> dict[str, Any]:
    cfg = load_config(name, overrides)
    t0 = time.perf_counter()
    out = {"fast": summary(mm.predict_fast_step(cfg)), "reference": summary(predict_reference_step(cfg))}
    return {**out, "model": cfg.model.arch, "crop": list(cfg.data.crop_size), "batch": cfg.data.batch_size,
            "seconds": time.perf_counter() - t0}


class CudaPeak:
    """torch.cuda's allocator peak: what the trainer prints beside the prediction."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> int:
        """Free what can be freed, reset the peak; returns the bytes still allocated (not this region's)."""
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)


def measure_on_device(cfg: Config, device: torch.device, mem: Any = None) -> dict[str, int]:
    """Both trainers for real on `device`, one after the other, each from a reset peak: the fast `Trainer` (its
    step loader replaced by one device batch of the loader's shapes) stepped through its warm-up and capture and
    two more steps; the reference's step twice. Returns each one's peak bytes minus what was allocated before."""
    mem = mem or CudaPeak(device)
    cfg = mm.cuda_settings(cfg)
    out = {}
    base = mem.reset()
    run = Trainer(cfg, DistInfo(device=device), ("", ""), say=lambda msg: print(msg, flush=True))
    run.loader = itertools.repeat(mm.loader_batch(cfg, cfg.data.batch_size, device))
    with run.backends():
        for _ in range(run.warmup_steps + 2):
            run.step()
    out["fast"] = mem.peak() - base
    run.close()
    del run
    base = mem.reset()
    with reference_run(cfg, fake=False, device=device) as step:
        step(0)
        step(1)
        out["reference"] = mem.peak() - base
    return out


def markdown(results: dict[str, Any]) -> str:
    """The docs table: one row per preset and trainer."""
    cols = [name for name, _ in mm.TABLE]
    lines = [f"| preset | model, crop, batch | trainer | {' | '.join(cols)} | peak | peak during |",
             "|" + "---|" * (len(cols) + 5)]
    for name, r in results["presets"].items():
        what = f"{r['model']}, {r['crop'][0]}x{r['crop'][1]}, {r['batch']}"
        for t in TRAINERS:
            p = r[t]
            cells = " | ".join(fmt(p["columns_gib"][c] * mm.GIB) for c in cols)
            lines.append(f"| {name} | {what} | {t} | {cells} | **{fmt(p['peak_gib'] * mm.GIB)}** | "
                         f"{PHASES.get(p['peak_during'], p['peak_during'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    flags, overrides = split_overrides(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", nargs="+", default=preset_names(), help="presets or YAML files (default: every preset)")
    p.add_argument("--check-cpu", nargs="?", const="synthetic", default="", metavar="PRESET",
                   help="a preset's step also on real CPU tensors beside its prediction (default: synthetic)")
    p.add_argument("--check-crop", type=int, default=48, help="the crop of the CPU check (default 48)")
    p.add_argument("--measure-cuda", action="store_true", help="measure both trainers on the GPU as well")
    p.add_argument("--out", default="", help="folder for memory_<date>.json and .md (default: print only)")
    args = p.parse_args(flags)
    results: dict[str, Any] = {"presets": {}}
    for name in args.config:
        r = results["presets"][name] = predict_preset(name, overrides)
        print(f"{name}: predicted peak fast {fmt(r['fast']['peak_gib'] * mm.GIB)}, reference "
              f"{fmt(r['reference']['peak_gib'] * mm.GIB)} ({r['seconds']:.1f} s)", flush=True)
    print(markdown(results))
    if args.check_cpu:
        c = args.check_crop
        cfg = load_config(args.check_cpu, [f"data.crop_size=[{c},{c}]"])
        results["cpu_check"] = {"config": args.check_cpu, "crop": [c, c],
                                "triton_interpret": os.environ.get("TRITON_INTERPRET", ""), **check_on_cpu(cfg)}
        for t in TRAINERS:
            r = results["cpu_check"][t]
            print(f"CPU check {args.check_cpu} {c}x{c} {t}: predicted {r['predicted_mib']:.2f} MiB, live tensors "
                  f"{r['live_tensors_mib']:.2f} MiB, CPU allocator peak {r['allocator_mib']:.2f} MiB "
                  f"(x{r['allocator_mib'] / r['predicted_mib']:.2f})")
    if args.measure_cuda:
        name = args.config[0]
        measured = measure_on_device(load_config(name, overrides), torch.device("cuda"))
        results["cuda_measured_gib"] = {name: {t: v / mm.GIB for t, v in measured.items()}}
        for t in TRAINERS:
            pred = results["presets"][name][t]["peak_gib"] * mm.GIB
            print(f"[memory] {name} {t}: predicted {fmt(pred)}, torch.cuda.max_memory_allocated "
                  f"{fmt(measured[t])} (x{measured[t] / pred:.2f})", flush=True)
    if args.out:
        device = "cuda" if args.measure_cuda else "cpu"
        stem = os.path.join(args.out, f"memory_{datetime.date.today():%Y%m%d}")
        write_result(stem + ".json", {"env": result_env(device, command_line("python -m bench.memory", argv)),
                                      **results})
        with open(stem + ".md", "w") as f:
            f.write(markdown(results) + "\n")
        print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
