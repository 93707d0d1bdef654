"""The cost model checked on this CPU: its rates measured when the command runs, its predicted fast step compared
with bench.profile_step's measured one, per operator class, on the same config (the `synthetic` preset: `tiny`,
128x128 crops, batch 2+2, fp32, eager, channels_last, the adjoint MMD from interpolation matrices).

    python -m bench.cost_model --device cpu --compare [--steps 5] [--rounds 5] [--threads 1] [--json OUT]

In each of --rounds rounds (the machine may be shared: medians over the rounds are used, every round is written)
the rates are measured, then --steps steps profiled: the fp32 matmul rate (a 1024^3 matmul), the bandwidth of a
256 MiB copy (bench._env.copy_bandwidth_gbs), and the self time of one eager operator under torch.profiler (a
64-element add: dispatch and allocation, which profile_step counts in every operator's self time), all with the
torch threads profile_step runs with (--threads N sets them). The cost model's own
efficiencies (bench.cost_model.EFFICIENCY) are kept: the check is of the model as the GPU prediction uses it.

Two predictions: "model" is bench.cost_step's recording on the meta device (what the GPU figures use); "recorded"
counts the operators of the trainer's real step on CPU tensors (Trainer.step under the same dispatch mode, loader
included), a check of what the meta recording misses. profile_step's data wait has no counterpart: reported apart.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import os
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench._env import copy_bandwidth_gbs
from bench.cost_model import CLASSES, EFFICIENCY, Counter, predict
from bench.cost_step import dsp_parts, record_step
from bench.profile_step import RESULTS, event_class, profile_steps, summarise
from bench.result_schema import command_line, result_env, write_result


def matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def op_self_s(n: int = 400) -> float:
    """The profiler's self time of one small eager operator with what it runs inside (the allocation of its output:
    an aten::empty event of its own), per call: what each of the step's operators pays at least."""
    a, b = torch.randn(64), torch.randn(64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            torch.add(a, b)
    return sum(e.self_cpu_time_total for e in prof.events() if e.name.startswith("aten::")) / n / 1e6


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_cpu() -> dict:
    return {"fp32_flops": matmul_flops(), "bytes_per_s": 1e9 * copy_bandwidth_gbs("cpu"), "op_s": op_self_s(),
            "threads": torch.get_num_threads()}


def build_trainer():
    """The fast trainer as bench.profile_step builds it (synthetic preset, CPU, no images or tensorboard)."""
    from bench.throughput.setup import build_config, fast_data_dirs
    from bench.throughput.trainers import build_fast, warm_up
    from dsp_fast.engine.distributed import DistInfo

    cfg = build_config("synthetic", [], None, None, "cpu")
    cfg = dataclasses.replace(cfg, fast=dataclasses.replace(cfg.fast, image_every=0, tensorboard=False))
    info = DistInfo(device=torch.device("cpu"))
    trainer = build_fast(cfg, info, fast_data_dirs(cfg, info), say=lambda m: None)
    warm_up(trainer, 2)
    return cfg, trainer


def record_trainer_step(trainer) -> list:
    """The operators of one real Trainer.step on CPU tensors (loader, buffers, choices, losses, update)."""
    counter = Counter()
    with trainer.flags(), counter, dsp_parts(counter, paste_as_kernel=False):
        trainer.step()
    counter._alive.clear()
    return counter.ops


def compare(steps: int, threads: int = 0, rounds: int = 3) -> dict:
    """`rounds` x (rates, then `steps` profiled steps): the medians per class and per rate (the machine is shared)."""
    if threads:
        torch.set_num_threads(threads)
    cfg, trainer = build_trainer()
    rates, per_round, per_op_rounds, data_ms = [], [], [], []
    try:
        real_ops = record_trainer_step(trainer)
        real_step = trainer.step

        def step() -> float:
            waited = real_step()
            data_ms.append(1e3 * waited)
            return waited

        trainer.step = step
        for _ in range(rounds):
            rates.append(measure_cpu())
            prof = profile_steps(trainer, steps)
            per_round.append(summarise(prof, steps, 0.0)["ms_per_step_by_class"])
            per_op_rounds.append(self_ms_by_op(prof, steps))
    finally:
        trainer.close()
    counts = {c: 0.0 for c in CLASSES}
    for evt in prof.events():  # the last round's events per step, per class
        if event_class(evt) in counts:
            counts[event_class(evt)] += 1 / steps
    measured = {c: statistics.median(r[c] for r in per_round) for c in CLASSES}
    measured["data wait"] = statistics.median(data_ms)
    rate = {k: statistics.median(r[k] for r in rates) for k in ("fp32_flops", "bytes_per_s", "op_s")}
    model_ops, _ = record_step(cfg.model.arch, cfg.data.crop_size[0], cfg.data.batch_size, fast=True, cpu=True,
                               batched=cfg.fast.batched_student)
    args = (rate["fp32_flops"], rate["bytes_per_s"], rate["op_s"])
    names = {n for r in per_op_rounds for n in r}
    measured_op = {n: statistics.median(r.get(n, 0.0) for r in per_op_rounds) for n in names}
    predicted_op = predict_by_op(model_ops, *args)
    residual_op = sorted(((n, measured_op.get(n, 0.0), predicted_op.get(n, 0.0)) for n in names | set(predicted_op)),
                         key=lambda t: -abs(t[1] - t[2]))[:16]
    return {"config": "synthetic", "arch": cfg.model.arch, "crop": list(cfg.data.crop_size),
            "batch": cfg.data.batch_size, "steps": steps, "rounds": rounds, "rates_measured": rates,
            "rates_used": rate, "efficiency": EFFICIENCY, "model": predict(model_ops, *args),
            "recorded": predict(real_ops, *args), "measured_ms_by_class": measured,
            "measured_rounds": per_round, "profiler_events_per_step": counts,
            "largest_residuals_by_op": [{"op": n, "measured_ms": m, "model_ms": q} for n, m, q in residual_op]}


# the CPU's convolution kernels (and their wrappers) under the operator the dispatch mode records
CONV_NAMES = {"conv2d": "convolution", "_convolution": "convolution", "mkldnn_convolution": "convolution",
              "_slow_conv2d_forward": "convolution", "_slow_conv2d_backward": "convolution_backward"}


def self_ms_by_op(prof, steps: int) -> dict[str, float]:
    """Self time per aten operator name per step, every profiler event (nested ones too; convolution kernels
    under the recorded convolution operators)."""
    out: dict[str, float] = collections.defaultdict(float)
    for evt in prof.events():
        if evt.name.startswith("aten::"):
            name = evt.name[len("aten::"):]
            out[CONV_NAMES.get(name, name)] += evt.self_cpu_time_total / 1e3 / steps
    return out


def predict_by_op(ops: list, matrix_flops: float, bytes_per_s: float, launch_s: float) -> dict[str, float]:
    out: dict[str, float] = collections.defaultdict(float)
    for op in ops:
        out[op.name] += predict([op], matrix_flops, bytes_per_s, launch_s)["compute_ms"]
    return out


def print_compare(r: dict) -> None:
    u = r["rates_used"]
    print(f"cost model on this CPU ({r['arch']} {r['crop'][0]}x{r['crop'][1]} B={r['batch']}, fp32, eager): "
          f"matmul {u['fp32_flops'] / 1e9:.0f} GFLOP/s, copy {u['bytes_per_s'] / 1e9:.1f} GB/s, "
          f"{u['op_s'] * 1e6:.1f} us per operator (threads {r['rates_measured'][0]['threads']}); "
          f"efficiencies {EFFICIENCY['matrix']} / {EFFICIENCY['memory']}")
    print(f"{'class':<26}{'measured':>9}{'model':>9}{'resid.':>9}{'recorded':>9}{'resid.':>9}"
          f"{'ops m/r/prof':>16}{'GB m/r':>12}{'GFLOP':>7}")
    tot = {"measured": 0.0, "model": 0.0, "recorded": 0.0}
    for cls in CLASSES:
        meas = r["measured_ms_by_class"].get(cls, 0.0)
        m = r["model"]["per_class"].get(cls, {"ms": 0.0, "ops": 0, "gbyte": 0.0, "gflop": 0.0})
        q = r["recorded"]["per_class"].get(cls, {"ms": 0.0, "ops": 0, "gbyte": 0.0})
        tot["measured"] += meas
        tot["model"] += m["ms"]
        tot["recorded"] += q["ms"]
        ops = f"{m['ops']}/{q['ops']}/{r['profiler_events_per_step'][cls]:.0f}"
        print(f"{cls:<26}{meas:>9.2f}{m['ms']:>9.2f}{meas - m['ms']:>+9.2f}{q['ms']:>9.2f}{meas - q['ms']:>+9.2f}"
              f"{ops:>16}{m['gbyte']:>6.3f}/{q['gbyte']:.3f}{m['gflop']:>7.2f}")
    print(f"{'step (without data wait)':<26}{tot['measured']:>9.2f}{tot['model']:>9.2f}"
          f"{tot['measured'] - tot['model']:>+9.2f}{tot['recorded']:>9.2f}{tot['measured'] - tot['recorded']:>+9.2f}")
    print(f"data wait (profile_step; no counterpart in the model): {r['measured_ms_by_class']['data wait']:.2f} ms")
    conv = r["model"]["per_class"]["convolution"]["gflop"] / (r["measured_ms_by_class"]["convolution"] / 1e3)
    print(f"convolutions measured at {conv:.0f} GFLOP/s: {conv * 1e9 / u['fp32_flops']:.2f} of the matmul rate "
          f"(the model assumes {EFFICIENCY['matrix']})")
    print("largest residuals by operator (profiler self time, every event of that name; model, ms per step):")
    for row in r["largest_residuals_by_op"]:
        print(f"  {row['op']:<36}{row['measured_ms']:>8.2f}{row['model_ms']:>8.2f}")


def compare_main(steps: int, json_path: str = "", threads: int = 0, rounds: int = 3) -> int:
    r = compare(steps, threads, rounds)
    r["env"] = result_env("cpu", command_line("python -m bench.cost_model"))
    print_compare(r)
    path = json_path or os.path.join(RESULTS, f"cost_model_cpu_check_{datetime.date.today():%Y%m%d}.json")
    write_result(path, r)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    print(json.dumps(measure_cpu()))
