"""Where a fast-trainer step spends its time: a few steps under torch.profiler, operators grouped by class.

    python -m bench.profile_step [--config synthetic] [--steps 5] [--warmup 2] [--out bench/results]

The fast trainer (the engine's Trainer, as the throughput comparison builds it: bench/throughput/trainers.py) is
built on the config's data and warmed up, then `--steps` steps are profiled. Each aten operator's self time goes to
one class: convolution (forward and backward), batch norm, matmul, elementwise / reduction, the DSP operators,
optimizer + EMA (foreach / fused SGD) and data wait (what the trainer reports blocked on its loader). The DSP
operators are the step's two calls into dsp_fast.kernels (dual soft-paste, weighted MMD), wrapped in profiler ranges
here: every aten operator they run (the Triton launch on a GPU; the twin or the adjoint's plain-PyTorch operators
elsewhere) counts as DSP, forward only (autograd's backward of the MMD runs outside the range and counts in its
classes). Writes a table (top operators and the classes, as text and JSON) and a bar chart of the classes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import functools
import os
import sys
from collections.abc import Iterator

import torch
from PIL import Image, ImageDraw
from torch.profiler import ProfilerActivity, profile, record_function

from bench.cost_model import aten_class
from bench.result_schema import command_line, result_env, write_result
from bench.throughput.setup import build_config, fast_data_dirs
from bench.throughput.trainers import FastBench, build_fast, warm_up
from dsp_fast import method
from dsp_fast.engine.distributed import DistInfo
from dsp_fast.run_io import resolve_device

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CLASSES = ("convolution", "batch norm", "matmul", "elementwise / reduction", "DSP ops", "optimizer + EMA",
           "data wait")


def op_class(name: str) -> str | None:
    """The class of a profiler event name; None for events that only contain others (their children count)."""
    if name == "data_wait":
        return "data wait"
    if name.startswith("dsp_fast::") or "adjoint" in name or "soft_paste" in name:
        return "DSP ops"
    if not name.startswith("aten::"):
        return None
    return aten_class(name[len("aten::"):])


DSP_RANGE = "dsp_range::"
DSP_CALLS = ("dual_soft_paste", "weighted_mmd")


@contextlib.contextmanager
def wrapped_method_calls(names, wrap) -> Iterator[None]:
    """dsp_fast.method's functions `names` replaced by wrap(name, fn) while the block runs (the step looks them up
    in dsp_fast.method at call time), then restored."""
    saved = {name: getattr(method, name) for name in names}
    for name, fn in saved.items():
        setattr(method, name, functools.wraps(fn)(wrap(name, fn)))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(method, name, fn)


def dsp_ranges() -> contextlib.AbstractContextManager:
    """The step's calls into dsp_fast.kernels inside profiler ranges."""

    def ranged(name, fn):
        def call(*args, **kwargs):
            with record_function(DSP_RANGE + name):
                return fn(*args, **kwargs)
        return call

    return wrapped_method_calls(DSP_CALLS, ranged)


def event_class(evt) -> str | None:
    """op_class, except that anything inside a DSP range is a DSP op."""
    parent = evt
    while parent is not None:
        if parent.name.startswith(DSP_RANGE):
            return "DSP ops" if evt.name.startswith("aten::") or evt.name.startswith("dsp_fast::") else None
        parent = parent.cpu_parent
    return op_class(evt.name)


def profile_steps(trainer: FastBench, steps: int) -> profile:
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else []),
                 record_shapes=False) as prof, trainer.flags(), dsp_ranges():
        for _ in range(steps):
            with record_function("step"):
                trainer.step()
    return prof


def summarise(prof: profile, steps: int, data_ms_per_step: float) -> dict:
    """Self time per class and the top operators, per step."""
    by_class: dict[str, float] = collections.defaultdict(float)
    by_op: dict[str, float] = collections.defaultdict(float)
    for evt in prof.events():
        cls = event_class(evt)
        if cls is None or cls == "data wait":
            continue
        ms = evt.self_cpu_time_total / 1e3 / steps  # self time: nested aten calls are not counted twice
        by_class[cls] += ms
        by_op[evt.name + (" (DSP)" if cls == "DSP ops" and not evt.name.startswith("dsp_fast::") else "")] += ms
    by_class["data wait"] = data_ms_per_step
    total = sum(by_class.values())
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:15]
    return {"ms_per_step_by_class": {c: by_class.get(c, 0.0) for c in CLASSES}, "total_ms_per_step": total,
            "top_operators_ms_per_step": dict(top)}


def write_chart(summary: dict, path: str, title: str) -> None:
    rows = list(summary["ms_per_step_by_class"].items())
    width, bar_h, left = 760, 26, 200
    img = Image.new("RGB", (width, 60 + bar_h * len(rows)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), title, fill="black")
    peak = max(ms for _, ms in rows) or 1.0
    for i, (cls, ms) in enumerate(rows):
        y = 40 + i * bar_h
        draw.text((10, y + 6), cls, fill="black")
        draw.rectangle([left, y + 4, left + int((width - left - 120) * ms / peak), y + bar_h - 4], fill=(70, 110, 180))
        draw.text((width - 110, y + 6), f"{ms:.1f} ms ({100 * ms / summary['total_ms_per_step']:.0f}%)", fill="black")
    img.save(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="synthetic", help="preset name or YAML path")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    cfg = build_config(args.config, args.overrides, None, None, str(device))
    cfg = dataclasses.replace(cfg, fast=dataclasses.replace(cfg.fast, image_every=0, tensorboard=False))
    info = DistInfo(device=device)
    trainer = build_fast(cfg, info, fast_data_dirs(cfg, info), say=lambda m: None)
    try:
        warm_up(trainer, args.warmup + trainer.extra_warmup)
        data_ms = []
        real_step = trainer.step

        def step() -> float:  # the trainer reports its own data wait per step (the loader's next)
            waited = real_step()
            data_ms.append(1e3 * waited)
            return waited

        trainer.step = step
        prof = profile_steps(trainer, args.steps)
    finally:
        trainer.close()
    summary = summarise(prof, args.steps, sum(data_ms) / max(1, len(data_ms)))
    summary.update({"env": result_env(str(device), command_line("python -m bench.profile_step")),
                    "device": str(device),
                    "arch": cfg.model.arch, "crop": list(cfg.data.crop_size), "batch": cfg.data.batch_size,
                    "steps": args.steps, "threads": torch.get_num_threads(),
                    "fast_options": dataclasses.asdict(cfg.fast)})
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    base = os.path.join(args.out, f"profile_step_{device.type}_{stamp}")
    write_result(base + ".json", summary)
    title = f"fast step, {cfg.model.arch} {cfg.data.crop_size[0]}x{cfg.data.crop_size[1]} B={cfg.data.batch_size}, " \
            f"{device}: {summary['total_ms_per_step']:.1f} ms/step (self time by class)"
    write_chart(summary, base + ".png", title)
    print(title)
    print(f"{'class':<26}{'ms/step':>9}{'share':>8}")
    for cls, ms in summary["ms_per_step_by_class"].items():
        print(f"{cls:<26}{ms:>9.2f}{100 * ms / summary['total_ms_per_step']:>7.0f}%")
    print("top operators (self time, ms/step):")
    for name, ms in summary["top_operators_ms_per_step"].items():
        print(f"  {name:<50}{ms:>8.2f}")
    print(f"wrote {base}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
