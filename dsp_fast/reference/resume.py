"""The reference trainer's resume: what `last.pt` holds beyond the weights, and how a run continues from it exactly
(docs/training.md, "Run folders and resume").

Besides the student, teacher, optimizer (Torch171SGD's momentum too) and step, it holds the CPU generator's state
(the DataLoader's crops draw from it) and the choice generator's. A resumed run rebuilds the loaders from their seeds
and draws the batches of the steps done without training on them, then restores both generators: bit for bit,
whatever `data.num_workers`, at the cost of reading those images once more.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from dsp_fast.resume import Checkpoints
from dsp_fast.run_io import atomic_torch_save

FORMAT = "dsp_fast.reference/1"
LAST = "last.pt"


def _last(folder: str) -> list[str]:
    return [path] if os.path.isfile(path := os.path.join(folder, LAST)) else []


CHECKPOINTS = Checkpoints(
    format=FORMAT, trainer="dsp_fast.reference", runs_root="reference", pattern=LAST, files=_last,
    foreign="it holds no RNG state to continue from exactly (written before reference resume existed, or by the "
            "fast trainer)")
"""A reference run folder is `<train.out_dir>/reference[_<n>]` (the fast trainer owns train.out_dir itself); each
model has one checkpoint, last.pt, rewritten in place. `--resume` follows dsp_fast/resume.py."""


def save_state(path: str, run: Any, step: int, rng: dict[str, torch.Tensor] | None = None) -> None:
    """last.pt of a reference run at `step` (`run`: a job.ReferenceRun), written atomically with its checksum.
    `rng`: the generators' states at the start of `step` (default: as they are now, between steps)."""
    rng = rng or {"cpu": torch.get_rng_state(), "choices": run.gen.get_state()}
    atomic_torch_save({"format": FORMAT, "student": run.student.state_dict(), "teacher": run.teacher.state_dict(),
                       "optimizer": run.optimizer.state_dict(), "step": step, "config": run.cfg.to_dict(),
                       "input_kind": getattr(run.student, "input_kind", "torchvision"),
                       "rng": rng}, path)


def restore(run: Any, ckpt: dict[str, Any], replay: Any) -> int:
    """Load the weights and optimizer, replay the loaders over the steps done (`replay()`: draws one step's
    batches), set both generators; returns the step to continue from."""
    run.student.load_state_dict(ckpt["student"])
    run.teacher.load_state_dict(ckpt["teacher"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    step = int(ckpt["step"])
    for _ in range(step):
        replay()
    torch.set_rng_state(ckpt["rng"]["cpu"])
    run.gen.set_state(ckpt["rng"]["choices"])
    return step
