"""Seeds: the same training run once per seed, and per-class IoU and mIoU as mean +- std over them.

    python -m dsp_fast.sweep --config synthetic --seeds 0 1 2 [--out DIR] [trainer flags] [section.field=value ...]

Each seed is one `python -m dsp_fast.train` run (docs/training.md, "Seeds"); DIR (default `<train.out_dir>_sweep`, a
new folder per sweep) holds `sweep.json` (per model: each seed's figures; per class and for the mIoU the mean, the
sample standard deviation and the count) and `sweep.md` (the table, also printed), as DAFormer and its followers
report over three seeds. Exit code: 0, or the first failing seed's, after writing the figures of the seeds before it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
from typing import Any

from dsp_fast.atomic_io import atomic_write
from dsp_fast.config import ConfigError, load_config, split_overrides
from dsp_fast.resume import new_run_dir


def aggregate(values: list[float | None]) -> dict[str, Any]:
    """mean, sample std (n - 1; None below 2 values) and count of the seeds' values that exist (an IoU is null
    in a seed where the class was neither in the labels nor predicted)."""
    present = [v for v in values if v is not None and not math.isnan(v)]
    return {"mean": statistics.fmean(present) if present else None,
            "std": statistics.stdev(present) if len(present) >= 2 else None, "n": len(present), "values": values}


def summarise_model(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One model's final records (summary.json's `models` entries, one per seed): mIoU, teacher mIoU and per-class
    IoU over the seeds."""
    classes = list(records[0]["iou"])
    return {
        "mIoU": aggregate([r["mIoU"] for r in records]),
        "teacher_mIoU": aggregate([r.get("teacher_mIoU") for r in records]),
        "classes_evaluated": [r["classes_evaluated"] for r in records],
        "iou": {c: aggregate([r["iou"].get(c) for r in records]) for c in classes},
    }


def summarise(summaries: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per model of the runs' summary.json files ({seed: summary}): `summarise_model` over the seeds."""
    names = list(next(iter(summaries.values()))["models"]) if summaries else []
    return {name: summarise_model([s["models"][name] for s in summaries.values()]) for name in names}


def _cell(a: dict[str, Any]) -> str:
    if a["mean"] is None:
        return "n/a"
    text = f"{100 * a['mean']:.1f}"
    if a["std"] is not None:
        text += f" +- {100 * a['std']:.1f}"
    return text if a["n"] == len(a["values"]) else f"{text} ({a['n']} of {len(a['values'])} seeds)"


def format_table(models: dict[str, Any], seeds: list[int]) -> str:
    """Markdown: one row per class, then the student's mIoU (the figure reported) and the teacher's; mean +- sample
    std over the seeds, in percent."""
    names = list(models)
    if not names:
        return "no finished seed"
    classes = list(models[names[0]]["iou"])
    n_cls = len(classes)
    lines = [f"| class ({len(seeds)} seeds: {' '.join(map(str, seeds))}) | {' | '.join(names)} |",
             "|---|" + "---|" * len(names)]
    lines += [f"| {c} | {' | '.join(_cell(models[n]['iou'][c]) for n in names)} |" for c in classes]
    lines.append(f"| **mIoU{n_cls}** (student) | {' | '.join(_cell(models[n]['mIoU']) for n in names)} |")
    lines.append(f"| mIoU{n_cls} (teacher) | {' | '.join(_cell(models[n]['teacher_mIoU']) for n in names)} |")
    per_seed = "; ".join(f"{n}: " + ", ".join("n/a" if v is None else f"{100 * v:.1f}" for v in
                                               models[n]["mIoU"]["values"]) for n in names)
    return "\n".join(lines) + f"\n\nstudent mIoU per seed ({' '.join(map(str, seeds))}): {per_seed}\n" \
        "mean +- sample standard deviation (n - 1) over the seeds; each mIoU averages the classes present in that " \
        "seed's labels or predictions"


def write_results(folder: str, seeds: list[int], runs: dict[int, str], summaries: dict[int, dict[str, Any]],
                  command: list[str]) -> str:
    """sweep.json and sweep.md in `folder`; returns the table."""
    models = summarise(summaries)
    table = format_table(models, [s for s in seeds if s in summaries])
    record = {"seeds": seeds, "finished": sorted(summaries), "command": shlex.join(command),
              "runs": {str(s): os.path.abspath(p) for s, p in runs.items()}, "models": models}
    for name, text in (("sweep.json", json.dumps(record, indent=1)), ("sweep.md", table + "\n")):
        atomic_write(os.path.join(folder, name), text)
    return table


def check_runs(seeds: list[int], overrides: list[str], trainer_flags: list[str], prog: str,
               fields: tuple[str, ...] = ("train.seed", "train.out_dir")) -> None:
    """ConfigError unless each seed is given once, no override sets a field `prog` sets per run (`fields`), and the
    trainer flags start fresh runs (`prog` resumes its runs itself, or not at all)."""
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: each seed once, got {seeds}")
    for text in overrides:
        if text.split("=", 1)[0] in fields:
            raise ConfigError(f"{text}: the {prog} sets {', '.join(fields)} of each run itself (--seeds, --out)")
    if "--resume" in trainer_flags:
        raise ConfigError(f"--resume: the {prog} starts its runs itself (resume a run folder with dsp_fast.train)")


def train_command(config: str, trainer_flags: list[str], overrides: list[str], seed: int, out_dir: str) -> list[str]:
    """The `python -m dsp_fast.train` command of one seed's run in `out_dir`."""
    return [sys.executable, "-m", "dsp_fast.train", "--config", config, *trainer_flags, *overrides,
            f"train.seed={seed}", f"train.out_dir={out_dir}"]


def train_once(cmd: list[str], out_dir: str) -> tuple[int, str]:
    """Run one trainer command, its output streaming through; (exit code, the run folder it printed last, else
    `out_dir`)."""
    print(f"\n=== {shlex.join(cmd[1:])}", flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1)
    folder = out_dir
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            sys.stdout.write(line)
            if line.startswith("run folder: "):  # 'run folder: PATH (summary: ...)', the trainer's last lines
                folder = line[len("run folder: "):].split(" (")[0].rstrip("\n")
    except KeyboardInterrupt:
        # Ctrl-C reached the trainer too (one process group): it finishes its step and writes a checkpoint, which
        # needs its stdout open; a second Ctrl-C stops both at once
        for line in proc.stdout:  # type: ignore[union-attr]
            sys.stdout.write(line)
        proc.wait()
        raise
    return proc.wait(), folder


def read_summary(run_folder: str) -> dict[str, Any]:
    """A finished run's summary.json."""
    with open(os.path.join(run_folder, "summary.json")) as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsp_fast.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="synthetic", help="preset name or YAML, as for dsp_fast.train")
    parser.add_argument("--seeds", type=int, nargs="+", required=True, help="train.seed of each run, e.g. 0 1 2")
    parser.add_argument("--out", default=None, help="the sweep's folder (default: <train.out_dir>_sweep, new)")
    flags, overrides = split_overrides(sys.argv[1:] if argv is None else list(argv))
    args, trainer_flags = parser.parse_known_args(flags)
    try:
        check_runs(args.seeds, overrides, trainer_flags, "sweep")
        cfg = load_config(args.config, overrides)  # a bad config fails here, before the first seed
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    folder = new_run_dir(args.out or f"{os.path.normpath(cfg.train.out_dir)}_sweep")
    print(f"sweep folder: {os.path.abspath(folder)} (seeds {' '.join(map(str, args.seeds))})", flush=True)
    command = [sys.executable, "-m", "dsp_fast.sweep", *(sys.argv[1:] if argv is None else argv)]
    runs: dict[int, str] = {}
    summaries: dict[int, dict[str, Any]] = {}
    code = 0
    for seed in args.seeds:
        out = os.path.join(folder, f"seed_{seed}")
        try:
            code, runs[seed] = train_once(train_command(args.config, trainer_flags, overrides, seed, out), out)
        except KeyboardInterrupt:  # the seed's run wrote its checkpoint; the figures of the seeds before it stand
            print(f"\ninterrupted at seed {seed}; its run continues with: python -m dsp_fast.train --resume "
                  f"{shlex.quote(os.path.abspath(out))}", file=sys.stderr, flush=True)
            code = 130
            break
        if code != 0:
            print(f"error: seed {seed} failed (exit code {code}); the figures of the seeds before it are written",
                  file=sys.stderr)
            break
        summaries[seed] = read_summary(runs[seed])
    table = write_results(folder, args.seeds, runs, summaries, command)
    print(f"\n{table}\n\nsweep: {os.path.abspath(os.path.join(folder, 'sweep.json'))} and sweep.md", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
