"""Throughput of the fast trainer against the naive reference trainer: same config, data and device, one process.

    python -m bench.throughput                                   # CPU: the synthetic preset, tiny model
    python -m bench.throughput --config gta2cs --data paper --data-backend torch   # GPU, paper config
    python -m bench.throughput --smoke --out /tmp/x              # CI-sized: 2 warm-up + 2 timed steps, 1 round

Both trainers are built once and stepped in place (trainers.py). After each one's warm-up (the fast one's also
covers the CUDA-graph warm-up and capture), `--rounds` rounds each time `--steps` steps of one trainer then of the
other (the order swaps every round), so a drifting machine load hits both; figures are medians over rounds, the
headline the median of the per-round ratios fast / reference. Each region is timed between device synchronizes;
data wait is the time blocked on the loader, compute the rest. images/s counts 3 x B crops per DSP step. MFU =
counted FLOPs per step / step time / the device's measured matmul rate (bf16 on CUDA, fp32 on CPU). Ablation: the
fast trainer with one optimisation off at a time, alternated round by round with the full fast trainer (n/a, with
the reason, where the fast trainer does not use it on this device). The JSON is rewritten after every timed round
("complete": false until the end), so a run stopped by a timeout keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import math
import os
import statistics
import sys
import time

import torch

from bench.provenance import RESULTS_DIR, parse_args, result_env, stamped, tool_parser, version, write_result
from bench.throughput.report import print_summary, write_chart
from bench.throughput.scaling import run_scaling
from bench.throughput.setup import build_config, matrix_rate, paper_data, step_flops
from bench.throughput.trainers import FastBench, ReferenceTrainer, build_fast, time_steps, warm_up
from dsp_fast.config import ConfigError, FastConfig
from dsp_fast.engine.data_setup import prepared_dirs, resolve_backend
from dsp_fast.engine.distributed import DistInfo
from dsp_fast.engine.trainer import amp_dtype
from dsp_fast.kernels._common import HAS_TRITON, interpreting
from dsp_fast.run_io import resolve_device

ABLATIONS = ("dali", "producer", "cache", "kernels", "channels_last", "batched_student", "amp", "graphs")


def ablation_variant(key: str, fast: FastBench) -> tuple[str, dict, bool] | str:
    """(label, fast options, kernel twins) of the variant with `key` turned off, or why it is n/a here (the fast
    trainer does not use it on this device)."""
    dev, o = fast.device, fast.trainer.cfg.fast
    where = "on CPU" if dev.type == "cpu" else f"on {dev}"
    if key == "dali":
        if fast.trainer.backend != "dali":
            return f"n/a {where}: the fast trainer reads with the {fast.trainer.backend!r} backend here"
        return "DALI off (torch backend)", {"data_backend": "torch"}, False
    if key == "producer":
        if fast.trainer.backend != "torch" or not o.data_producer:
            return "n/a: no read-ahead thread here (the DALI backend, or fast.data_producer 0)"
        return "read-ahead thread off (read when asked)", {"data_producer": 0}, False
    if key == "cache":
        held = getattr(fast.trainer.loader, "in_memory", {})
        if "held" not in held.values():
            return "n/a: no prepared set held in memory here (the DALI backend, or over fast.data_cache_mib)"
        return "decoded pixels not held (decode at each read)", {"data_cache_mib": 0}, False
    if key == "kernels":
        if fast.twins:
            return "n/a: --twins, the fast trainer already runs the twins"
        if not (HAS_TRITON and (dev.type == "cuda" or interpreting())):
            # no Triton here, but the weighted MMD's adjoint (interpolation matrices) still runs: off = naive twin
            return "adjoint MMD off (naive twins)", {}, True
        return "fused kernels off (twins)", {}, True
    if key == "channels_last":
        if not o.channels_last:
            return "n/a: the fast trainer runs NCHW"
        return "channels_last off (NCHW)", {"channels_last": False}, False
    if key == "batched_student":
        if not o.batched_student or not fast.trainer.cfg.dsp.enabled:
            return "n/a: the fast trainer calls the student three times already"
        return "batched student off (three calls)", {"batched_student": False}, False
    if key == "amp":
        if amp_dtype(o, dev) == torch.float32:
            return f"n/a {where}: the fast trainer computes in fp32 here (autocast off)"
        return "AMP off (fp32)", {"amp": "fp32"}, False
    if key == "graphs":
        if not fast.trainer.graphs:
            return f"n/a {where}: CUDA graphs need CUDA (and fused SGD)"
        return "CUDA graphs off (eager)", {"cuda_graphs": False}, False
    raise ValueError(f"unknown ablation {key!r}")


def alternate(a, b, rounds: int, steps: int, say, on_round=lambda rows_a, rows_b: None
              ) -> tuple[list[dict], list[dict]]:
    """`rounds` rounds of `steps` steps of a then b (b then a on odd rounds); per-round figures of each.
    `on_round` sees the rows so far after every round (the caller saves them: a timeout keeps what was measured)."""
    out_a, out_b = [], []
    for r in range(rounds):
        order = (a, b) if r % 2 == 0 else (b, a)
        got = {t.name: time_steps(t, steps) for t in order}
        out_a.append(got[a.name])
        out_b.append(got[b.name])
        say(f"  round {r + 1}/{rounds}: {a.name} {got[a.name]['images_per_s']:.2f} img/s, "
            f"{b.name} {got[b.name]['images_per_s']:.2f} img/s")
        on_round(out_a, out_b)
    return out_a, out_b


def summarise(rows: list[dict], flops: float, rate: float) -> dict:
    med = {k: statistics.median(r[k] for r in rows) if v is not None else None for k, v in rows[0].items()}
    med["mfu"] = flops / (med["ms_per_step"] / 1e3) / rate
    med["data_wait_fraction"] = med["data_ms"] / med["ms_per_step"]
    return {**med, "rounds": rows}


def run_ablations(keys: list[str], fast: FastBench, make_fast, args, flops: float, rate: float, headline: float,
                  say, save) -> list[dict]:
    """Each variant alternated with the full fast trainer; `save` sees the rows after every round and variant.
    share_of_log_gain = log(fast/variant) / log(fast/reference): the shares need not add up to 1 (optimisations
    interact, and what no flag turns off, such as prepared data, no per-step host sync, fused SGD, is the rest)."""
    out: list[dict] = []
    for key in keys:
        v = ablation_variant(key, fast)
        if isinstance(v, str):
            out.append({"key": key, "status": "n/a", "reason": v})
            say(f"[ablation] {key}: {v}")
            continue
        label, opts, twins = v
        say(f"[ablation] {label}: build, warm up, {args.rounds} rounds alternating with the full fast trainer")
        variant = make_fast(key, opts, twins)
        try:
            warm_up(variant, args.warmup + variant.extra_warmup)
            var_rows, fast_rows = alternate(variant, fast, args.rounds, args.steps, say, lambda va, fa, k=key: save(
                [*out, {"key": k, "status": "partial", "variant_rounds": va, "fast_same_rounds": fa}]))
        finally:
            variant.close()
            del variant
            gc.collect()
        r = statistics.median(f["images_per_s"] / q["images_per_s"] for q, f in zip(var_rows, fast_rows))
        out.append({"key": key, "status": "measured", "label": label, "options": opts, "kernel_twins": twins,
                    "variant": summarise(var_rows, flops, rate), "fast_same_rounds": summarise(fast_rows, flops, rate),
                    "fast_over_variant": r,
                    "share_of_log_gain": math.log(r) / math.log(headline) if headline > 1 and r > 0 else None})
        save(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = tool_parser("bench.throughput", __doc__)
    p.add_argument("--config", default="synthetic", help="preset name or YAML file shared by both trainers")
    p.add_argument("--arch", default=None, help="model.arch override (tiny, deeplabv2_r101, mit_b0..mit_b5)")
    p.add_argument("--crop", type=int, default=None, help="square crop size override")
    p.add_argument("--data", choices=("config", "paper"), default="config",
                   help="config: the config's data; paper: generated scenes of GTA5 / Cityscapes file sizes")
    p.add_argument("--paper-images", type=int, nargs=2, default=(12, 6), metavar=("SOURCE", "TARGET"))
    p.add_argument("--device", default="auto")
    p.add_argument("--data-backend", default="auto", choices=("auto", "dali", "torch"), help="fast trainer loader")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="timed steps per trainer per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per trainer (plus the graph warm-up)")
    p.add_argument("--ablations", nargs="*", default=list(ABLATIONS), help=f"of {ABLATIONS}; none: -")
    p.add_argument("--scaling", type=int, default=2, help="processes for the scaling run (0 or 1: skip)")
    p.add_argument("--smoke", action="store_true", help="CI size: 1 round, 2 warm-up + 2 timed steps")
    p.add_argument("--out", default=RESULTS_DIR, help="folder for the JSON and PNG")
    p.add_argument("--tag", default="", help="suffix of the result file names")
    p.add_argument("--no-chart", dest="chart", action="store_false", help="write the JSON only")
    p.add_argument("--twins", action="store_true",
                   help="the fast trainer with the kernels' plain-PyTorch twins (where Triton cannot run)")
    args = parse_args(p, argv, overrides=True)
    if args.smoke:
        args.rounds, args.steps, args.warmup = 1, 2, 2
    args.ablations = [a for a in args.ablations if a != "-"]
    device = resolve_device(args.device)
    try:
        resolve_backend(FastConfig(data_backend=args.data_backend), DistInfo(device=device))
    except ConfigError as e:  # e.g. --data-backend dali where DALI does not import: a message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        overrides, fast = args.overrides, {"data_backend": args.data_backend}
        if args.data == "paper":
            paper, src, tgt = stack.enter_context(paper_data(*args.paper_images, workers=os.cpu_count() or 1))
            overrides = [*paper, *overrides]
            fast.update(prepared_source=src, prepared_target=tgt)
        cfg = build_config(args.config, overrides, args.arch, args.crop, str(device))
        cfg = dataclasses.replace(cfg, fast=dataclasses.replace(cfg.fast, **fast))
        tag = args.tag or ("smoke" if args.smoke else "")
        path = stamped(args.out, f"throughput_{device_tag(device)}", tag) + ".json"
        result = measure(args, cfg, device, save=lambda partial: write_result(path, partial))
    write_result(path, result)
    if args.chart:
        write_chart(result, path[:-5] + ".png")
    print_summary(result)
    print(f"wrote {path}" + (f" and {path[:-5]}.png" if args.chart else ""))
    return 0


def measure(args: argparse.Namespace, cfg, device: torch.device, save) -> dict:
    """The comparison; `save` receives an incomplete result after every timed round."""
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    info = DistInfo(device=device)
    load_start = os.getloadavg()  # other jobs share this machine: recorded beside the figures
    opts = cfg.fast  # every option of the fast trainer: the config's own `fast:` section
    dirs = prepared_dirs(cfg, info, check_eval=False)  # the bench never evaluates
    say(f"config: {cfg.model.arch}, crop {cfg.data.crop_size}, batch {cfg.data.batch_size}, {device}, "
        f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
        "counting FLOPs and measuring the matmul rate")
    flops, rate = step_flops(cfg, device), matrix_rate(device)
    f_step, r = float(flops["step"]), float(rate["flops_per_s"])
    t0 = time.perf_counter()
    ref = ReferenceTrainer(cfg, device)
    fast = build_fast(cfg, info, dirs, twins=args.twins, say=say)

    def make_fast(key: str, changed: dict, twins: bool) -> FastBench:
        variant = dataclasses.replace(cfg, fast=dataclasses.replace(opts, **changed))
        return build_fast(variant, info, dirs, name=f"fast-{key}", twins=twins or args.twins, say=say)

    say(f"built both trainers in {time.perf_counter() - t0:.1f} s (fast: {fast.trainer.backend} backend, "
        f"amp {amp_dtype(opts, device)}, channels_last {opts.channels_last}, graphs {fast.trainer.graphs}); "
        "warming up")
    warm_up(ref, args.warmup)
    warm_up(fast, args.warmup + fast.extra_warmup)
    env = result_env(str(device), args.command, dali=version("nvidia.dali"), threads=str(torch.get_num_threads()),
                     OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS"), load_average_1_5_15_start=load_start,
                     TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET"))

    def save_partial(**rows) -> None:
        save({"complete": False, "env": env, "config_file": args.config, "arch": cfg.model.arch, **rows})

    say(f"{args.rounds} rounds of {args.steps} steps, alternating")
    ref_rows, fast_rows = alternate(ref, fast, args.rounds, args.steps, say,
                                    lambda a, b: save_partial(reference_rounds=a, fast_rounds=b))
    ref.close()
    del ref  # frees the reference's memory before the ablation variants are built
    gc.collect()
    ratios = [f["images_per_s"] / q["images_per_s"] for q, f in zip(ref_rows, fast_rows)]
    headline = statistics.median(ratios)
    ablation = run_ablations(args.ablations, fast, make_fast, args, f_step, r, headline, say,
                             lambda abl: save_partial(reference_rounds=ref_rows, fast_rounds=fast_rows,
                                                      headline=headline, ablation=abl))
    fast.close()
    scaling = run_scaling(args, cfg, dirs, device, say) if args.scaling > 1 else {"status": "skipped"}
    return {
        "complete": True,
        "env": {**env, "load_average_1_5_15_end": os.getloadavg()},
        "config": {"config_file": args.config, "kernel_twins": args.twins, "data": args.data, "arch": cfg.model.arch,
                   "crop": list(cfg.data.crop_size), "batch": cfg.data.batch_size, "dsp": cfg.dsp.enabled,
                   "fast_backend": opts.data_backend, "resolved": cfg.to_dict()},
        "method": {"rounds": args.rounds, "steps_per_round": args.steps, "warmup": args.warmup, "smoke": args.smoke,
                   "images_per_step": "3 x batch (source, template, target crops; long-tail crops not counted)",
                   "peak_memory": "CUDA allocator peak per region (none on CPU)"},
        "flops": flops, "matmul_rate": rate,
        "trainers": {"reference": summarise(ref_rows, f_step, r), "fast": summarise(fast_rows, f_step, r)},
        "headline": {"fast_over_reference": headline, "per_round": ratios},
        "ablation": ablation, "scaling": scaling,
    }


def device_tag(device: torch.device) -> str:
    """cpu, or cuda_<the GPU's name> for result file names."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).replace("NVIDIA", "").strip()
        return "cuda_" + "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()
    return "cpu"


if __name__ == "__main__":
    sys.exit(main())
