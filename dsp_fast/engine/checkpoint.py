"""Checkpoints of the fast trainer: everything an exact resume needs, written atomically, the last K kept.

A checkpoint `ckpt_<step>.pt` holds the student, the teacher, the optimizer, the GradScaler, the step (the loader is
step-indexed: the step is the data position), the skipped-step counters, the best eval mIoU and every rank's RNG
states, as tensors and plain values (it loads with `weights_only=True`), with `config` and `input_kind` so that
`python -m dsp_fast.evaluate` reads it. Checksums and `--resume`: dsp_fast/checkpoint_file.py and dsp_fast/resume.py
(CHECKPOINTS tells it these files). Pruning to the last K never deletes the checkpoint just written (the newest
good one), even when newer-numbered bad ones are left from an earlier run.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any

import torch

from dsp_fast.checkpoint_file import CHECKSUM_SUFFIX, RunWriteError, atomic_torch_save, remove_checkpoint
from dsp_fast.resume import Checkpoints

FORMAT = "dsp_fast.train/1"
_NAME = re.compile(r"^ckpt_(\d{8})\.pt$")
BEST = "best.pt"


def checkpoint_name(step: int) -> str:
    return f"ckpt_{step:08d}.pt"


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the periodic checkpoints in `run_dir`, oldest first (temp files of a killed write skipped)."""
    if not os.path.isdir(run_dir):
        return []
    found = [(int(m.group(1)), os.path.join(run_dir, n)) for n in os.listdir(run_dir) if (m := _NAME.match(n))]
    return sorted(found)


CHECKPOINTS = Checkpoints(
    format=FORMAT, trainer="dsp_fast.train", runs_root="", pattern="ckpt_<step>.pt",
    files=lambda folder: [p for _, p in list_checkpoints(folder)],
    foreign="a reference checkpoint has no optimizer RNG or data position to continue from exactly")


def rng_state(gen: torch.Generator) -> dict[str, Any]:
    """This rank's RNG states as tensors (weights_only-loadable): the CPU generator, the CUDA generator of the choice
    generator's GPU only (every GPU's would open a context on each), and the choice generator."""
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


def clean_stale(run_dir: str) -> None:
    """Remove temp files left by a write that was killed (atomic_torch_save names them <path>.tmp.<pid>, its
    checksum's <path>.sha256.tmp.<pid>), and checksums whose checkpoint is gone (a kill while pruning)."""
    for tmp in glob.glob(os.path.join(run_dir, "*.pt.tmp.*")) + glob.glob(os.path.join(run_dir, "*.pt.sha256.tmp.*")):
        os.remove(tmp)
    for side in glob.glob(os.path.join(run_dir, "*.pt" + CHECKSUM_SUFFIX)):
        if not os.path.exists(side[: -len(CHECKSUM_SUFFIX)]):
            os.remove(side)
