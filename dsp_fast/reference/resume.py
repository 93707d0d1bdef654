"""The reference trainer's resume: what `last.pt` holds beyond the weights, and how a run continues from it exactly.

The checkpoint adds, to the student, teacher, optimizer (momentum buffers, the Torch171SGD's too) and step, the
CPU generator's state (the crops of the DataLoader draw from it) and the choice generator's. The loaders are not
saved: a resumed run rebuilds them from the seeds, as a fresh run does, and draws (reads and crops) the batches of
the steps already done, without training on them; then both generators are set to their saved states. The run
then continues bit for bit, whatever `data.num_workers` (the workers are reseeded from the loaders' own
generators each epoch, and the replay consumes those as the first start did). The cost: reading the images of
every step done once more (seconds on the synthetic shift, minutes per thousand steps on GTA5-sized images).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from dsp_fast.config import Config
from dsp_fast.run_io import atomic_torch_save, latest_run_dir, read_checkpoint_file

FORMAT = "dsp_fast.reference/1"
FIXED = (("model", "arch"), ("dsp", "enabled"), ("train", "max_steps"), ("train", "seed"), ("data", "batch_size"),
         ("data", "crop_size"))
"""Fields a reference checkpoint fixes: the run it continues has these as it was trained with."""


class ReferenceResumeError(ValueError):
    """A --resume target that is missing, unreadable, or another run's (exit code 2)."""


def save_state(path: str, run: Any, step: int, rng: dict[str, torch.Tensor] | None = None) -> None:
    """last.pt of a reference run at `step` (`run`: a runner.ReferenceRun), written atomically with its checksum.
    `rng`: the generators' states at the start of `step` (default: as they are now, between steps)."""
    rng = rng or {"cpu": torch.get_rng_state(), "choices": run.gen.get_state()}
    atomic_torch_save({"format": FORMAT, "student": run.student.state_dict(), "teacher": run.teacher.state_dict(),
                       "optimizer": run.optimizer.state_dict(), "step": step, "config": run.cfg.to_dict(),
                       "input_kind": getattr(run.student, "input_kind", "torchvision"),
                       "rng": rng}, path)


def resume_top(spec: str, out_dir: str) -> str | None:
    """The reference run folder a --resume continues: 'auto' -> the newest `<out_dir>/reference[_<n>]` (None: none);
    a folder -> itself; last.pt (or any checkpoint file) -> its folder, or the folder above a model's subfolder."""
    if spec == "auto":
        return latest_run_dir(os.path.join(out_dir, "reference"))
    if os.path.isfile(spec):
        folder = os.path.dirname(os.path.abspath(spec))
        return os.path.dirname(folder) if os.path.basename(folder) in ("dsp", "source_only") else folder
    if os.path.isdir(spec):
        return spec
    raise ReferenceResumeError(f"--resume {spec}: no such checkpoint file or run folder")


def read_state(folder: str, cfg: Config) -> dict[str, Any] | None:
    """The checkpoint one model continues from (`folder`/last.pt, verified against its checksum), None when that
    model has none yet (it starts at step 0)."""
    path = os.path.join(folder, "last.pt")
    if not os.path.exists(path):
        return None
    try:
        ckpt = read_checkpoint_file(path)
    except ValueError as e:
        raise ReferenceResumeError(f"--resume: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ReferenceResumeError(f"--resume: {path} holds no RNG state to continue from exactly (written before "
                                   f"reference resume existed, or by the fast trainer)")
    saved, now = ckpt["config"], cfg.to_dict()
    for section, key in FIXED:
        a, b = saved[section][key], now[section][key]
        if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            raise ReferenceResumeError(f"--resume: {path} was trained with {section}.{key}={a!r}, this config has "
                                       f"{b!r}; a checkpoint continues only the run it came from")
    return ckpt


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
