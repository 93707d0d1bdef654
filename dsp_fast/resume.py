"""Run folders and `--resume`, one set of rules for both trainers (dsp_fast.train and dsp_fast.reference).

The rules are docs/training.md's "Run folders and resume": a new folder per run (`root`, `root_2`, ...; the
reference's root is `<train.out_dir>/reference`); `--resume` auto / a run folder / a checkpoint file continues one,
from its saved config.yaml with the overrides on top, each model from its newest checkpoint that verifies; a FIXED
field that changes is a ResumeError (exit code 2). What a checkpoint holds is each trainer's own
(engine/checkpoint.py, reference/resume.py); `Checkpoints` says what these rules need of it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from dsp_fast.checkpoint_file import read_checkpoint_file
from dsp_fast.config import Config, ConfigError, load_config
from dsp_fast.run_io import PROVENANCE

FIXED = (("model", "arch"), ("model", "num_classes"), ("dsp", "enabled"), ("train", "max_steps"), ("train", "seed"),
         ("data", "batch_size"), ("data", "crop_size"))
"""The fields a checkpoint fixes: the weights' shapes (arch, classes), what is trained (DSP on or off), the lr
schedule's length, and the data and choice streams a step index stands for (seed, batch, crop)."""

CLAIM = ".run"
"""The empty file whose exclusive creation makes a folder one run's (new_run_dir)."""
_MODEL_FOLDERS = ("source_only", "dsp")  # a train.compare_source_only run's (a single model trains in the run folder)


class ResumeError(ValueError):
    """A --resume target that does not exist, holds no checkpoint, or does not fit this run (exit code 2)."""


@dataclasses.dataclass(frozen=True)
class Checkpoints:
    """What the resume rules need to know of one trainer's checkpoints."""

    format: str  # the payload's "format" entry; a file without it is not continued
    trainer: str  # the module that writes them, named in errors
    runs_root: str  # the subfolder of train.out_dir that holds this trainer's run folders ('': train.out_dir itself)
    pattern: str  # how a model folder's checkpoint files are named, for messages
    files: Callable[[str], list[str]]  # a model folder's checkpoint files, oldest first
    foreign: str  # why a file of another format cannot be continued exactly

    def root(self, out_dir: str) -> str:
        return os.path.join(out_dir, self.runs_root) if self.runs_root else out_dir


def _run_dirs(out_dir: str) -> list[tuple[int, str]]:
    """(number, path) of the existing run folders of `out_dir`: itself (1), then out_dir_2, out_dir_3, ..."""
    out_dir = os.path.normpath(out_dir)
    parent, base = os.path.split(out_dir)
    found = [(1, out_dir)] if os.path.isdir(out_dir) else []
    pattern = re.compile(rf"^{re.escape(base)}_(\d+)$")
    if os.path.isdir(parent or "."):
        for name in os.listdir(parent or "."):
            if (m := pattern.match(name)) and int(m.group(1)) >= 2 and os.path.isdir(os.path.join(parent, name)):
                found.append((int(m.group(1)), os.path.join(parent, name)))
    return sorted(found)


def _is_free(folder: str) -> bool:
    """Nothing of an earlier run in it (the reference trainer's own `reference*` subfolders do not count)."""
    return not os.path.exists(folder) or (os.path.isdir(folder) and
                                          not [n for n in os.listdir(folder) if not n.startswith("reference")])


def check_out_dir(out_dir: str, field: str = "train.out_dir") -> None:
    """Before any data is prepared: `out_dir` can hold run folders (it, or its nearest existing parent, is a folder
    this process may write in); a ConfigError naming `field` and the path otherwise."""
    path = os.path.abspath(out_dir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise ConfigError(f"config field '{field}': {out_dir} cannot be a folder: {path} is a file")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"config field '{field}': {out_dir}: no permission to write in {path}")


def new_run_dir(out_dir: str) -> str:
    """Create and return a folder for a new run: `out_dir` when free, else the next `out_dir_<n>`. A folder is
    claimed by creating its CLAIM file exclusively, so two runs started at once get two folders."""
    n = 1 if _is_free(out_dir) else max((k for k, _ in _run_dirs(out_dir)), default=1) + 1
    while True:
        folder = os.path.normpath(out_dir) if n == 1 else f"{os.path.normpath(out_dir)}_{n}"
        os.makedirs(folder, exist_ok=True)
        try:
            os.close(os.open(os.path.join(folder, CLAIM), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return folder
        except FileExistsError:  # another process took that number just now
            n += 1


def _run_folder(spec: str, out_dir: str, kind: Checkpoints, say: bool = False) -> str | None:
    """The run folder a --resume continues: 'auto' -> the newest under `out_dir` that has a checkpoint (None: none
    yet; `say`: name the newer ones passed over); a folder -> itself; a checkpoint file -> its folder, or the folder
    above a model's subfolder. '' (a fresh run) -> None."""
    if not spec:
        return None
    if spec == "auto":  # the newest run (the highest number) that has a checkpoint: a start that failed is no run
        runs = [p for _, p in _run_dirs(kind.root(out_dir)) if not _is_free(p)]
        found = [p for p in runs if has_checkpoint(p, kind)]
        if say and found and (passed := runs[runs.index(found[-1]) + 1:]):
            _say(f"--resume auto: passing over {', '.join(passed)} (no checkpoint); continuing {found[-1]}")
        return found[-1] if found else None
    if os.path.isfile(spec):
        folder = os.path.dirname(os.path.abspath(spec))
        # a run folder holds provenance.json from its start; a model's subfolder does not
        is_model = os.path.basename(folder) in _MODEL_FOLDERS and not os.path.exists(os.path.join(folder, PROVENANCE))
        return os.path.dirname(folder) if is_model else folder
    if os.path.isdir(spec):
        return spec
    raise ResumeError(f"--resume {spec}: no such checkpoint file or run folder")


def has_checkpoint(run_dir: str, kind: Checkpoints) -> bool:
    return any(kind.files(os.path.join(run_dir, sub)) for sub in ("", *_MODEL_FOLDERS))


def _saved_config(run_dir: str) -> tuple[str, list[str]] | None:
    """The resolved config a run folder holds, and the overrides that make it the run's: its config.yaml; for a
    train.compare_source_only run, the adapted model's dsp/config.yaml, or (stopped before it began) the source-only
    model's with DSP on again; both runs are planned again from it."""
    for sub, fix in (("", []), ("dsp", []), ("source_only", ["dsp.enabled=true"])):
        if os.path.isfile(path := os.path.join(run_dir, sub, "config.yaml")):
            return path, fix
    return None


def _plain(x: Any) -> Any:
    return list(x) if isinstance(x, (list, tuple)) else x


def _mismatches(saved: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, saved value, `now`'s value) for every FIXED field that differs between two config dicts."""
    return [(f"{section}.{key}", saved.get(section, {}).get(key), now[section][key]) for section, key in FIXED
            if _plain(saved.get(section, {}).get(key)) != _plain(now[section][key])]


def _say(*args: Any, **kwargs: Any) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(*args, **kwargs, flush=True)


def resume_config(spec: str, overrides: Sequence[str], command_config: Callable[[], Config],
                  kind: Checkpoints) -> Config:
    """The config a --resume continues with: the run folder's resolved config (flags and scaled lr included), the
    overrides applied on top (and printed). `command_config()` (--config and the overrides) only finds the folder of
    `--resume auto`, or is the config when there is nothing to resume. An override of a FIXED field is a
    ResumeError naming it."""
    cfg = command_config() if spec == "auto" else None
    top = _run_folder(spec, cfg.train.out_dir if cfg else "", kind)
    if top is None:
        return cfg or command_config()  # a fresh run: find_checkpoints says so
    found = _saved_config(top)
    if found is None:
        _say(f"--resume: {top} holds no config.yaml; continuing with --config and the overrides as given")
        return cfg or command_config()
    saved, fix = found
    base = load_config(saved, fix)
    resumed = load_config(saved, [*fix, *overrides])
    for name, was, now in _mismatches(base.to_dict(), resumed.to_dict()):
        given = [t for t in overrides if t.split("=", 1)[0].strip() == name][-1:] or list(overrides)
        raise ResumeError(f"--resume {top}: the run was trained with {name}={was!r}; the override "
                          f"{' '.join(given)} would make it {now!r}, and a checkpoint continues only the run it came "
                          "from (drop the override, or start a fresh run without --resume)")
    on_top = f"; overrides applied on top: {' '.join(overrides)}" if overrides else " (no overrides)"
    _say(f"--resume: continuing {os.path.abspath(top)} with its saved config {saved} (in place of --config){on_top}")
    return resumed


def _newest_good(spec: str, folder: str, found: list[str]) -> tuple[str, Any]:
    """The newest of `found` that verifies and loads, with its contents; each bad newer one is named in a
    warning (rank 0)."""
    bad: list[str] = []
    for path in reversed(found):
        try:
            ckpt = read_checkpoint_file(path)
        except (ValueError, OSError) as e:
            bad.append(f"{path} ({e})" if str(e).find(path) < 0 else str(e))
            continue
        if bad:
            _say(f"warning: --resume {spec}: passed over {len(bad)} bad checkpoint(s): {'; '.join(bad)}. Continuing "
                 f"from {path}, the newest good one", file=sys.stderr)
        return path, ckpt
    raise ResumeError(f"--resume {spec}: no good checkpoint in {folder}: {'; '.join(bad)}")


def _check_checkpoint(ckpt: Any, path: str, cfg: Config, kind: Checkpoints) -> None:
    """A checkpoint continues only the run it came from: written by this trainer, with every FIXED field as `cfg`
    has it. The resumed config is the run folder's own (resume_config), so a mismatch here comes from a config
    file given without one, or from a checkpoint file moved out of its run folder."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != kind.format:
        raise ResumeError(f"--resume: {path} was not written by {kind.trainer} (format {kind.format}); "
                          f"{kind.foreign}")
    for name, a, b in _mismatches(ckpt.get("config", {}), cfg.to_dict())[:1]:
        raise ResumeError(f"--resume: {path} was trained with {name}={a!r}, but the config resumed with has "
                          f"{name}={b!r}; a checkpoint continues only the run it came from")


def find_checkpoints(spec: str, out_dir: str, models: Sequence[tuple[str, Config]], kind: Checkpoints,
                     ) -> tuple[str | None, dict[str, tuple[str, dict[str, Any]] | None]]:
    """The run folder a --resume continues (None: a fresh run) and, per model (its subfolder, '' for a single
    model, and its config), the checkpoint it continues from as (path, contents), read and checked; None: that
    model starts at step 0. Nothing is created, so a bad target fails before any data is prepared."""
    top = _run_folder(spec, out_dir, kind, say=True)  # resume_config found it first, silently
    found: dict[str, tuple[str, dict[str, Any]] | None] = {sub: None for sub, _ in models}
    if top is None:
        if spec == "auto":
            _say(f"--resume auto: no earlier run in {os.path.abspath(kind.root(out_dir))}, starting a fresh run")
        return None, found
    given = os.path.abspath(spec) if os.path.isfile(spec) else None
    folders = [os.path.abspath(os.path.join(top, sub)) for sub, _ in models]
    if given is not None and os.path.dirname(given) not in folders:
        raise ResumeError(f"--resume {spec}: this run trains its models in {', '.join(folders)}, and this file is "
                          "in none of them; pass the run folder or 'auto' instead")
    for sub, cfg in models:
        folder = os.path.join(top, sub) if sub else top
        if given is not None and os.path.dirname(given) == os.path.abspath(folder):
            try:
                path, ckpt = given, read_checkpoint_file(given)
            except (ValueError, OSError) as e:
                raise ResumeError(f"--resume: {e}") from None
        elif files := kind.files(folder):
            path, ckpt = _newest_good(spec, folder, files)
        else:
            continue
        _check_checkpoint(ckpt, path, cfg, kind)
        found[sub] = path, ckpt
    if not any(found.values()):
        if spec != "auto":
            raise ResumeError(f"--resume {spec}: no checkpoint ({kind.pattern}) in {top}")
        _say(f"--resume auto: no checkpoint in {top}, starting a fresh run")
        return None, found
    return top, found
