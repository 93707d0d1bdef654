"""Where a fast-trainer step spends its time: a few steps under torch.profiler, operators grouped by class.

    python -m bench.profile_step [--config synthetic] [--steps 5] [--warmup 2] [--fixed-batch] [--device auto]
                                 [--out bench/results] [--no-chart] [key=value ...]

The engine's `Trainer` reads the config's data (prepared and cached as bench.throughput prepares it) or, with
--fixed-batch, one batch of the loader's shapes again and again (no dataset, no data wait: the paper's config on a
machine without its images). Each operator's self time goes to one class of bench.cost_model (the fused kernels'
`dsp_fast::` operators are the DSP ops; where the twins run, their plain-PyTorch operators count in their own
classes); data wait is what the trainer reports blocked on its loader. On CUDA the time is the device time of each
operator's kernels and the step runs eager (a replayed CUDA graph's kernels belong to no operator): the figures
`python -m bench.cost_model --profile` sets beside its prediction.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from bench.cost_model import CLASSES, aten_class
from bench.memory import loader_batch
from bench.provenance import RESULTS_DIR, bar_chart, parse_args, result_env, stamped, tool_parser, write_result
from bench.throughput.setup import build_config
from dsp_fast.engine.data_setup import prepared_dirs
from dsp_fast.engine.distributed import DistInfo
from dsp_fast.engine.trainer import Trainer
from dsp_fast.run_io import resolve_device


def op_class(name: str) -> str | None:
    """The class of a profiler event; None for events that are not operators (ranges, the step's own)."""
    if name.startswith("aten::"):
        return aten_class(name[len("aten::"):])
    return "DSP ops" if name.startswith("dsp_fast::") else None


def profile_steps(run: Trainer, steps: int) -> tuple[profile, list[float]]:
    """`steps` steps under the profiler, and the seconds each was blocked on its loader."""
    cuda = run.info.device.type == "cuda"
    waits = []
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof, \
            run.backends():
        for _ in range(steps):
            waits.append(run.step())
        if cuda:
            torch.cuda.synchronize(run.info.device)
    return prof, waits


def summarise(prof: profile, steps: int, data_ms_per_step: float, device_time: bool) -> dict:
    """Self time per class and the top operators, per step (device time of their kernels with device_time)."""
    by_class: dict[str, float] = collections.defaultdict(float)
    by_op: dict[str, float] = collections.defaultdict(float)
    for evt in prof.events():
        cls = op_class(evt.name)
        if cls is None:
            continue
        ms = (evt.self_device_time_total if device_time else evt.self_cpu_time_total) / 1e3 / steps
        by_class[cls] += ms
        by_op[evt.name] += ms
    by_class["data wait"] = data_ms_per_step
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:15]
    return {"ms_per_step_by_class": {c: by_class.get(c, 0.0) for c in (*CLASSES, "data wait")},
            "total_ms_per_step": sum(by_class.values()), "top_operators_ms_per_step": dict(top)}


def main(argv: list[str] | None = None) -> int:
    p = tool_parser("bench.profile_step", __doc__)
    p.add_argument("--config", default="synthetic", help="preset name or YAML path")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--fixed-batch", action="store_true", help="one batch of the loader's shapes, no dataset")
    p.add_argument("--out", default=RESULTS_DIR)
    p.add_argument("--no-chart", dest="chart", action="store_false", help="write the JSON only")
    args = parse_args(p, argv, overrides=True)
    device = resolve_device(args.device)
    eager = ["fast.cuda_graphs=false"] if device.type == "cuda" else []  # a graph's kernels belong to no operator
    cfg = build_config(args.config, [*args.overrides, *eager], None, None, str(device))
    info = DistInfo(device=device)
    run = Trainer(cfg, info, ("", "") if args.fixed_batch else prepared_dirs(cfg, info, check_eval=False),
                  say=lambda m: None)
    if args.fixed_batch:
        run.loader = itertools.repeat(loader_batch(cfg, run.batch, device))
    try:
        with run.backends():
            for _ in range(args.warmup):
                run.step()
        prof, waits = profile_steps(run, args.steps)
    finally:
        run.close()
    summary = summarise(prof, args.steps, 1e3 * sum(waits) / len(waits), device.type == "cuda")
    summary.update({"env": result_env(str(device), args.command), "arch": cfg.model.arch,
                    "crop": list(cfg.data.crop_size), "batch": cfg.data.batch_size, "steps": args.steps,
                    "threads": torch.get_num_threads(), "fixed_batch": args.fixed_batch,
                    "fast_options": dataclasses.asdict(cfg.fast)})
    base, total = stamped(args.out, f"profile_step_{device.type}"), summary["total_ms_per_step"]
    write_result(base + ".json", summary)
    w, h = cfg.data.crop_size
    title = f"fast step, {cfg.model.arch} {w}x{h} B={cfg.data.batch_size}, {device}: {total:.1f} ms/step (self time)"
    if args.chart:
        bar_chart(base + ".png", [title], [(cls, ms, f"{ms:.1f} ms ({100 * ms / total:.0f}%)", "steelblue")
                                           for cls, ms in summary["ms_per_step_by_class"].items()])
    print(title)
    print(f"{'class':<26}{'ms/step':>9}{'share':>8}")
    for cls, ms in summary["ms_per_step_by_class"].items():
        print(f"{cls:<26}{ms:>9.2f}{100 * ms / total:>7.0f}%")
    print("top operators (self time, ms/step):")
    for name, ms in summary["top_operators_ms_per_step"].items():
        print(f"  {name:<50}{ms:>8.2f}")
    print(f"wrote {base}.json" + (" and .png" if args.chart else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
