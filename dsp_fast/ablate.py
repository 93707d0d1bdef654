"""The paper's ablation: DSP's pieces added one at a time, each row trained once per seed.

    python -m dsp_fast.ablate --config synthetic --seeds 0 1 2 [--out DIR] [trainer flags] [section.field=value ...]

Each row is a set of `dsp.*` switches on top of the given DSP config (ROWS; docs/ablation.md), each of its runs one
`python -m dsp_fast.train` in `DIR/<row>/seed_<seed>`, as dsp_fast.sweep runs seeds. The source-only row is the
source-only twin of the last row's run (`train.compare_source_only=true`; the other rows set it false), so no
source-only model is trained twice per seed. DIR (default `<train.out_dir>_ablation`) holds `ablation.json`,
`ablation.md` (the table, also printed) and `ablation.png` (the chart; matplotlib, the `[plot]` extra).

The same command again continues the newest unfinished ablation of the same settings under that root (finished runs
are read, not retrained; an interrupted one goes on with `--resume auto`); otherwise a new folder is made. A lock
held while it runs keeps two ablations at once out of one folder. Exit code: 0, or the first failing run's, after
writing the figures of the runs before it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

from dsp_fast.atomic_io import atomic_write
from dsp_fast.config import Config, ConfigError, DSPConfig, load_config, split_overrides
from dsp_fast.engine.job import plan_runs
from dsp_fast.resume import new_run_dir
from dsp_fast.run_io import git_state
from dsp_fast.sweep import check_runs, format_table, read_summary, summarise_model, train_command, train_once

Runner = Callable[[list[str], str], tuple[int, str]]
"""Runs one trainer command whose train.out_dir is the second argument: (exit code, the run folder)."""


@dataclasses.dataclass(frozen=True)
class Row:
    key: str  # its runs' sub-folder of the ablation folder
    name: str
    switches: Callable[[DSPConfig], dict[str, Any]]  # dsp fields set, from the given config's dsp section
    on_previous: bool  # the switches apply on top of the row above (else on the config itself)
    trained_in: str = ""  # the key of the row whose run trains this one as its source-only twin ('' : its own)


ROWS = (
    Row("source_only", "source-only", lambda d: {"enabled": False}, on_previous=False, trained_in="dsp"),
    Row("dacs", "DACS", lambda d: {"template": "source", "source_mix": False, "lam": 1.0, "num_long_tail": 0,
                                   "mmd_weight": 0.0}, on_previous=False),
    Row("soft_paste", "+ soft paste", lambda d: {"lam": d.lam}, on_previous=True),
    Row("dual", "+ dual (source mixed too)", lambda d: {"template": "separate", "source_mix": True}, on_previous=True),
    Row("long_tail", "+ long-tail first", lambda d: {"num_long_tail": d.num_long_tail}, on_previous=True),
    Row("dsp", "+ weighted MMD (= DSP)", lambda d: {"mmd_weight": d.mmd_weight}, on_previous=True),
)
"""The ablation's rows, top to bottom; the last one must come out as the config itself (plan_rows checks it)."""


def as_words(overrides: dict[str, Any]) -> list[str]:
    """{'dsp.lam': 1.0} -> ['dsp.lam=1.0']: `section.field=value` words, each value as YAML reads it back."""
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()]


@dataclasses.dataclass(frozen=True)
class PlannedRow:
    row: Row
    switches: dict[str, Any]  # 'dsp.field': value of every field the row sets, itself and the rows it builds on
    overrides: dict[str, Any]  # the switches where the row differs from the given config: what its runs override


def plan_rows(cfg: Config) -> list[PlannedRow]:
    """Each row's overrides, derived from `cfg` (a DSP config): only the fields where the row differs from it. A
    ConfigError when the last row is not the config itself (a config that is not DSP's)."""
    if not cfg.dsp.enabled:
        raise ConfigError("dsp.enabled is false: the ablation adds DSP's pieces to a DSP config, give one")
    planned: list[PlannedRow] = []
    fields: dict[str, Any] = {}
    for row in ROWS:
        fields = {**(fields if row.on_previous else {}), **row.switches(cfg.dsp)}
        planned.append(PlannedRow(row, {f"dsp.{k}": v for k, v in fields.items()},
                                  {f"dsp.{k}": v for k, v in fields.items() if getattr(cfg.dsp, k) != v}))
    if planned[-1].overrides:
        raise ConfigError(f"the ablation's last row is DSP as the config has it, but the config differs from DSP in "
                          f"{' '.join(as_words(planned[-1].overrides))} (give a DSP preset)")
    return planned


def _step(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    return None if a["mean"] is None or b["mean"] is None else b["mean"] - a["mean"]


def summarise_rows(planned: list[PlannedRow], records: dict[str, dict[int, dict[str, Any]]],
                   runs: dict[str, dict[int, str]], seeds: list[int]) -> list[dict[str, Any]]:
    """Per row: its switches and overrides, per seed the student's and teacher's mIoU and the run folder, and over
    the seeds (`summarise_model`) the mIoU, teacher mIoU and per-class IoU; `step`: its mean mIoU minus the row
    above's."""
    out: list[dict[str, Any]] = []
    for p in planned:
        key = p.row.key
        done = [s for s in seeds if s in records.get(key, {})]
        stats = summarise_model([records[key][s] for s in done]) if done else None
        per_seed = {str(s): {"mIoU": records[key][s]["mIoU"], "teacher_mIoU": records[key][s].get("teacher_mIoU"),
                             "run": runs[p.row.trained_in or key][s]} for s in done}
        out.append({"key": key, "name": p.row.name, "switches": p.switches, "overrides": p.overrides,
                    "trained_in": p.row.trained_in or key,
                    "per_seed": per_seed, **(stats or {}), "step": None})
        if stats and len(out) > 1 and "mIoU" in out[-2]:
            out[-1]["step"] = _step(out[-2]["mIoU"], stats["mIoU"])
    return out


def _pct(value: float | None, sign: bool = False) -> str:
    return "n/a" if value is None else f"{100 * value:{'+' if sign else ''}.1f}"


def format_ablation(rows: list[dict[str, Any]], config: str, seeds: list[int]) -> str:
    """Markdown: the ablation table (mIoU mean +- sample std with each seed's value, the step from the row above,
    the teacher's mIoU), then the per-class IoU of every row (sweep's table, one column per row)."""
    lines = [f"# Ablation of `{config}`, seeds {' '.join(map(str, seeds))}", "",
             "| row | overrides | student mIoU (per seed) | step | teacher mIoU |", "|---|---|---|---|---|"]
    for r in rows:
        words = " ".join(as_words(r["overrides"])) or "(the config)"
        if "mIoU" not in r:
            lines.append(f"| {r['name']} | `{words}` | not run yet | | |")
            continue
        m, t = r["mIoU"], r["teacher_mIoU"]
        cell = _pct(m["mean"]) + ("" if m["std"] is None else f" +- {_pct(m['std'])}")
        per_seed = ", ".join(f"{s}: {_pct(v['mIoU'])}" for s, v in r["per_seed"].items())
        teacher = _pct(t["mean"]) + ("" if t["std"] is None else f" +- {_pct(t['std'])}")
        step = "" if r["step"] is None else _pct(r["step"], sign=True)
        lines.append(f"| {r['name']} | `{words}` | {cell} ({per_seed}) | {step} | {teacher} |")
    lines += ["", "mIoU in percent, mean +- sample standard deviation (n - 1) over the seeds; step: the change of the "
              "mean from the row above. The source-only row is the last row's source-only twin "
              "(train.compare_source_only).", "", "## Per-class IoU", ""]
    done = [r for r in rows if "mIoU" in r]
    return "\n".join(lines) + "\n" + format_table({r["name"]: r for r in done}, seeds) + "\n"


def _folders(root: str) -> list[str]:
    """The ablation folders of `root` that new_run_dir made: root, root_2, ... up to the first missing number."""
    found, n = [], 1
    while os.path.isdir(folder := root if n == 1 else f"{root}_{n}"):
        found.append(folder)
        n += 1
    return found


def _lock(folder: str) -> Any | None:
    """The open lock file of `folder` held by this process, or None when another process holds it."""
    f = open(os.path.join(folder, ".ablation.lock"), "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def claim_folder(root: str, plan: dict[str, Any]) -> tuple[str, Any, dict[str, Any] | None]:
    """(folder, its held lock, its ablation.json when continued): the newest unfinished ablation of `plan` under
    `root` that no running process holds, else a new folder (locked before its plan is written, so a second
    ablation of the same plan started at once never takes it)."""
    for folder in reversed(_folders(root)):
        try:
            with open(os.path.join(folder, "ablation.json")) as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue
        if record.get("plan") == plan and not record.get("finished") and (lock := _lock(folder)) is not None:
            return folder, lock, record
    folder = new_run_dir(root)
    return folder, _lock(folder), None


def write_chart(path: str, rows: list[dict[str, Any]], config: str, seeds: list[int]) -> str | None:
    """ablation.png: a bar per row (mean mIoU, the sample std as error bar, the value written on it), each seed's
    value as a dot, the step from each row to the next between them. None when written; else why not."""
    try:
        from matplotlib.figure import Figure  # optional: the [plot] extra
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[plot]'): no ablation.png, the table and JSON are " \
               "written"
    done = [r for r in rows if "mIoU" in r]
    fig = Figure(figsize=(8, 1.0 + 0.6 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    ys = list(range(len(rows)))[::-1]  # the first row at the top
    for y, r in zip(ys, rows):
        if "mIoU" not in r:
            continue
        m = r["mIoU"]
        ax.barh(y, 100 * m["mean"], xerr=None if m["std"] is None else 100 * m["std"], color="#4c72b0",
                ecolor="black", capsize=4, height=0.6)
        dots = [100 * v for v in m["values"] if v is not None]
        ax.scatter(dots, [y] * len(dots), color="#dd8452", zorder=3, s=14)
        ax.text(100 * m["mean"] / 2, y, f"{100 * m['mean']:.1f}", va="center", ha="center", color="white",
                fontweight="bold")
        if r["step"] is not None:  # in the gap between this bar and the one above, at the right
            ax.annotate(_pct(r["step"], sign=True), (0.99, y + 0.5),
                        xycoords=("axes fraction", "data"), ha="right", va="center", fontsize=9,
                        color="#2a7d3b" if r["step"] >= 0 else "#c44e52")
    top = max((100 * (r["mIoU"]["mean"] + (r["mIoU"]["std"] or 0)) for r in done), default=1.0)
    top = max([top, *(100 * v for r in done for v in r["mIoU"]["values"] if v is not None)])
    ax.set_xlim(0, top * 1.25)  # room for the steps at the right
    ax.set_yticks(ys, [r["name"] for r in rows])
    ax.set_xlabel("target mIoU (%): bar the mean, whisker the sample std, dots the seeds\n"
                  "right: the change of the mean from the row above (green a gain, red a loss)")
    ax.set_title(f"DSP ablation: {config}, seeds {' '.join(map(str, seeds))}")
    fig.savefig(path, dpi=120)
    return None


def write_results(folder: str, record: dict[str, Any], rows: list[dict[str, Any]], chart: bool = False) -> str:
    """ablation.json and ablation.md in `folder` (and with `chart`, ablation.png); returns the table."""
    record = {**record, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": rows}
    config, seeds = record["plan"]["config"], record["plan"]["seeds"]
    table = format_ablation(rows, config, seeds)
    atomic_write(os.path.join(folder, "ablation.json"), json.dumps(record, indent=1))
    atomic_write(os.path.join(folder, "ablation.md"), table)
    if chart and (why := write_chart(os.path.join(folder, "ablation.png"), rows, config, seeds)) is not None:
        print(why, flush=True)
    return table


def run_overrides(planned: list[PlannedRow]) -> dict[str, list[str]]:
    """The overrides of each trained row's runs (the rows trained as another's twin have none): its own, and
    train.compare_source_only, true where the run trains a twin too."""
    hosts = {p.row.trained_in for p in planned}
    return {p.row.key: [*as_words(p.overrides), f"train.compare_source_only={json.dumps(p.row.key in hosts)}"]
            for p in planned if not p.row.trained_in}


def main(argv: list[str] | None = None, runner: Runner = train_once) -> int:
    """The command; `runner` trains one run (tests pass a stand-in)."""
    parser = argparse.ArgumentParser(prog="python -m dsp_fast.ablate", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="synthetic", help="a DSP preset or YAML, as for dsp_fast.train")
    parser.add_argument("--seeds", type=int, nargs="+", required=True, help="train.seed of each run, e.g. 0 1 2")
    parser.add_argument("--out", default=None, help="the ablation's folder (default: <train.out_dir>_ablation)")
    words = sys.argv[1:] if argv is None else list(argv)
    flags, overrides = split_overrides(words)
    args, trainer_flags = parser.parse_known_args(flags)
    try:
        check_runs(args.seeds, overrides, trainer_flags, "ablation",
                   ("train.seed", "train.out_dir", "train.compare_source_only"))
        cfg = load_config(args.config, overrides)
        planned = plan_rows(cfg)
        # every row's config checked before the first run; the model each row reads in its run's summary
        row_cfgs = {p.row.key: load_config(args.config, [*overrides, *as_words(p.overrides)]) for p in planned}
        run_cfgs = {k: load_config(args.config, [*overrides, *w]) for k, w in run_overrides(planned).items()}
        models = {p.row.key: _model_name(run_cfgs[p.row.trained_in or p.row.key], row_cfgs[p.row.key])
                  for p in planned}
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plan = {"config": args.config, "seeds": args.seeds, "overrides": overrides, "trainer_flags": trainer_flags}
    folder, lock, earlier = claim_folder(args.out or f"{os.path.normpath(cfg.train.out_dir)}_ablation", plan)
    command = [sys.executable, "-m", "dsp_fast.ablate", *words]
    with contextlib.closing(lock):
        try:
            return _ablate(folder, planned, models, plan, earlier, runner, command)
        except KeyboardInterrupt:  # the run in flight wrote its checkpoint (sweep.train_once waits for it)
            print(f"\ninterrupted: the finished runs' figures are in {os.path.abspath(folder)}; the same command "
                  f"continues the ablation from there:\n{shlex.join(command)}", file=sys.stderr, flush=True)
            return 130


def _model_name(run_cfg: Config, row_cfg: Config) -> str:
    """The name summary.json gives the model of `row_cfg` in the run of `run_cfg` (the trainer's plan)."""
    return next(name for name, c, _ in plan_runs(run_cfg) if c.dsp.enabled == row_cfg.dsp.enabled)


def _ablate(folder: str, planned: list[PlannedRow], models: dict[str, str], plan: dict[str, Any],
            earlier: dict[str, Any] | None, runner: Runner, command: list[str]) -> int:
    """Train what is not finished, seed by seed and row by row, writing the figures after every run."""
    words = run_overrides(planned)
    runs: dict[str, dict[int, str]] = {key: {} for key in words}  # finished runs' folders, by trained row and seed
    for r in (earlier or {}).get("rows", []):
        for seed, v in r["per_seed"].items():
            runs.setdefault(r["trained_in"], {})[int(seed)] = v["run"]
    records: dict[str, dict[int, dict[str, Any]]] = {p.row.key: {} for p in planned}
    record = {"plan": plan, "command": shlex.join(command), "git": git_state(), "finished": False,
              "started": (earlier or {}).get("started", time.strftime("%Y-%m-%dT%H:%M:%S%z"))}

    def save(chart: bool = False) -> str:
        return write_results(folder, record, summarise_rows(planned, records, runs, plan["seeds"]), chart)

    print(f"ablation folder: {os.path.abspath(folder)}{' (continued)' if earlier else ''}", flush=True)
    save()  # the plan on disk from the start: the same command finds this folder again
    code = 0
    for seed in plan["seeds"]:
        for key, run_words in words.items():
            out = os.path.join(folder, key, f"seed_{seed}")
            done = [f for f in (runs[key].get(seed), out) if f and os.path.isfile(os.path.join(f, "summary.json"))]
            if not done:
                cmd = train_command(plan["config"], plan["trainer_flags"], [*plan["overrides"], *run_words], seed, out)
                # a run interrupted by an earlier start goes on from its checkpoint (a fresh one if it has none)
                code, folder_run = runner([*cmd, *(["--resume", "auto"] if os.path.exists(out) else [])], out)
                if code != 0:
                    print(f"error: the {key} run of seed {seed} failed (exit code {code}); the figures of the runs "
                          "before it are written", file=sys.stderr)
                    break
                done = [folder_run]
            runs[key][seed] = os.path.abspath(done[0])  # the JSON names it from anywhere
            summary = read_summary(done[0])["models"]
            for p in planned:
                if (p.row.trained_in or p.row.key) == key:
                    records[p.row.key][seed] = summary[models[p.row.key]]
            save()
        if code != 0:
            break
    record["finished"] = code == 0
    table = save(chart=True)
    print(f"\n{table}\nablation: {os.path.abspath(folder)} (ablation.json, ablation.md, ablation.png)", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
