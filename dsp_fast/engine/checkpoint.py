"""Checkpoints of the fast trainer: everything an exact resume needs, written atomically, the last K kept.

A checkpoint `ckpt_<step>.pt` holds the student, the teacher, the optimizer (momentum buffers), the GradScaler,
the step (the loader is step-indexed, so the step is the data position), the skipped-step counters, the best
eval mIoU, and the RNG states of every rank (CPU, CUDA, and the device generator of the random choices), all as
tensors and plain values so that it loads with `weights_only=True`. It also carries `config` and `input_kind`,
so `python -m dsp_fast.evaluate --checkpoint` reads it like a reference checkpoint.

Each file has its SHA-256 beside it (`ckpt_<step>.pt.sha256`, dsp_fast/checkpoint_file.py). `--resume auto` (and
`--resume FOLDER`) take the newest checkpoint that verifies and loads: a torn or corrupt newer one is named in a
warning and passed over. Pruning to the last K never deletes the checkpoint just written (the newest good one),
even when newer-numbered bad ones are left from an earlier run.
"""

from __future__ import annotations

import glob
import os
import re
import sys
from typing import Any

import torch

from dsp_fast.checkpoint_file import (
    CHECKSUM_SUFFIX,
    RunWriteError,
    atomic_torch_save,
    read_checkpoint_file,
    remove_checkpoint,
)

FORMAT = "dsp_fast.train/1"
_NAME = re.compile(r"^ckpt_(\d{8})\.pt$")
BEST = "best.pt"


class ResumeError(ValueError):
    """A --resume target that does not exist, holds no checkpoint, or does not fit this run."""


def checkpoint_name(step: int) -> str:
    return f"ckpt_{step:08d}.pt"


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the periodic checkpoints in `run_dir`, oldest first (temp files of a killed write skipped)."""
    if not os.path.isdir(run_dir):
        return []
    found = [(int(m.group(1)), os.path.join(run_dir, n)) for n in os.listdir(run_dir) if (m := _NAME.match(n))]
    return sorted(found)


def rng_state(gen: torch.Generator) -> dict[str, Any]:
    """This rank's RNG states as tensors (weights_only-loadable): the CPU generator, the CUDA generator of the
    choice generator's GPU (only that one: asking for every GPU's would open a context on each), and the
    choice generator. Python's and numpy's global generators are not used by the training path."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state(), "choices": gen.get_state()}
    if gen.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(gen.device)
    return state


def restore_rng_state(state: dict[str, Any], gen: torch.Generator) -> None:
    torch.set_rng_state(state["cpu"])
    gen.set_state(state["choices"])
    if "cuda" in state and gen.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], gen.device)


def save(run_dir: str, payload: dict[str, Any], keep_last: int) -> str:
    """Write `payload` as ckpt_<step>.pt (atomically, with its checksum), then delete all but the newest
    `keep_last`, never the one just written. A failed write raises RunWriteError naming the checkpoint kept."""
    path = os.path.join(run_dir, checkpoint_name(payload["step"]))
    try:
        atomic_torch_save(payload, path)
    except RunWriteError as e:
        kept = [p for _, p in list_checkpoints(run_dir) if p != path]
        raise RunWriteError(f"{e}. The previous checkpoint stands: {kept[-1] if kept else 'none yet'}; free space "
                            "(or fix the folder's permissions), then continue with --resume auto") from None
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        if old != path:
            remove_checkpoint(old)
    return path


def save_best(run_dir: str, payload: dict[str, Any]) -> None:
    atomic_torch_save(payload, os.path.join(run_dir, BEST))


def clean_stale(run_dir: str) -> None:
    """Remove temp files left by a write that was killed (atomic_torch_save names them <path>.tmp.<pid>, its
    checksum's <path>.sha256.tmp.<pid>), and checksums whose checkpoint is gone (a kill while pruning)."""
    for tmp in glob.glob(os.path.join(run_dir, "*.pt.tmp.*")) + glob.glob(os.path.join(run_dir, "*.pt.sha256.tmp.*")):
        os.remove(tmp)
    for side in glob.glob(os.path.join(run_dir, "*.pt" + CHECKSUM_SUFFIX)):
        if not os.path.exists(side[: -len(CHECKSUM_SUFFIX)]):
            os.remove(side)


_read_ahead: dict[str, dict[str, Any]] = {}
"""Checkpoints already read while resolve_resume looked for a good one; load() takes them from here (one read)."""


def _newest_good(spec: str, folder: str, found: list[tuple[int, str]]) -> str:
    """The newest of `found` that verifies and loads; each bad newer one is named in a warning (rank 0)."""
    bad: list[str] = []
    for _, path in reversed(found):
        try:
            _read_ahead[path] = read_checkpoint_file(path)
        except (ValueError, OSError) as e:
            bad.append(f"{path} ({e})" if str(e).find(path) < 0 else str(e))
            continue
        if bad and os.environ.get("RANK", "0") == "0":
            print(f"warning: --resume {spec}: passed over {len(bad)} bad checkpoint(s): {'; '.join(bad)}. Continuing "
                  f"from {path}, the newest good one", file=sys.stderr, flush=True)
        return path
    raise ResumeError(f"--resume {spec}: no good checkpoint in {folder}: {'; '.join(bad)}")


def resolve_resume(spec: str, run_dir: str, sub: str) -> str | None:
    """The checkpoint file to resume from: spec '' -> none; 'auto' -> the newest in run_dir (none: a fresh start);
    a folder -> its newest (in <folder>/<sub> when that exists); a file -> that file."""
    if not spec:
        return None
    if spec == "auto":
        found = list_checkpoints(run_dir)
        return _newest_good(spec, run_dir, found) if found else None
    if os.path.isfile(spec):
        if sub:
            raise ResumeError(f"--resume {spec}: this run trains several models (train.compare_source_only); "
                              "pass the run folder or 'auto' instead of one file")
        return spec
    if os.path.isdir(spec):
        folder = os.path.join(spec, sub) if sub and os.path.isdir(os.path.join(spec, sub)) else spec
        found = list_checkpoints(folder)
        if not found:
            raise ResumeError(f"--resume {spec}: no checkpoint (ckpt_<step>.pt) in {folder}")
        return _newest_good(spec, folder, found)
    raise ResumeError(f"--resume {spec}: no such checkpoint file or run folder")


def load(path: str) -> dict[str, Any]:
    """A checkpoint of this trainer, verified against its checksum and read with weights_only=True; anything else
    is a ResumeError naming the file."""
    try:
        ckpt = _read_ahead.pop(path) if path in _read_ahead else read_checkpoint_file(path)
    except FileNotFoundError:
        raise ResumeError(f"--resume: checkpoint not found: {path}") from None
    except ValueError as e:
        raise ResumeError(f"--resume: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ResumeError(f"--resume: {path} was not written by dsp_fast.train (format {FORMAT}); a reference "
                          "checkpoint has no optimizer RNG or data position to continue from exactly")
    return ckpt


MUST_MATCH = (("model", "arch"), ("model", "num_classes"), ("dsp", "enabled"), ("train", "max_steps"),
              ("data", "batch_size"), ("data", "crop_size"))
"""The fields a checkpoint fixes: same model, same schedule length, same DSP switch, same batch and crop."""


def _plain(x: Any) -> Any:
    return list(x) if isinstance(x, (list, tuple)) else x


def mismatches(saved: dict[str, Any], cfg_dict: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, saved value, this config's value) for every MUST_MATCH field that differs."""
    out = []
    for section, key in MUST_MATCH:
        a, b = saved.get(section, {}).get(key), cfg_dict[section][key]
        if _plain(a) != _plain(b):
            out.append((f"{section}.{key}", a, b))
    return out


def check_compatible(ckpt: dict[str, Any], path: str, cfg_dict: dict[str, Any]) -> None:
    """A checkpoint continues only the run it came from (MUST_MATCH). The resumed config is the run folder's own
    (runner.resume_config), so a mismatch here comes from an override given with --resume, or from a checkpoint
    file moved out of its run folder."""
    for name, a, b in mismatches(ckpt.get("config", {}), cfg_dict)[:1]:
        raise ResumeError(f"--resume: {path} was trained with {name}={a!r}, but the config resumed with has "
                          f"{name}={b!r}; a checkpoint continues only the run it came from")
