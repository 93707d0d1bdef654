"""What the end-to-end tests of the trainers share: the tiny run on the synthetic shift (its command-line arguments
and environment), reading and comparing checkpoints bit for bit, and a trainer subprocess watched line by line so
that a signal lands at a chosen moment of the run."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = [sys.executable, "-m", "dsp_fast.train"]


def tiny_args(root: str, out: str, steps: int, *extra: str) -> list[str]:
    """The fast trainer on the synthetic shift at `root`: tiny model, 32x32 crops, two evaluation images."""
    return ["--config", "synthetic", f"data.synthetic_root={root}",
            f"train.out_dir={out}", f"train.max_steps={steps}", "data.crop_size=[32,32]", "data.eval_size=[64,32]",
            "data.max_eval_images=2", "train.compare_source_only=false", "train.log_every=4", *extra]


def quiet_args(root: str, out: str, steps: int, *extra: str) -> list[str]:
    """tiny_args with a progress line every step, and neither image grids nor TensorBoard."""
    return tiny_args(root, out, steps, "train.log_every=1", "--image-every", "0", "--no-tensorboard", *extra)


def env() -> dict[str, str]:
    """The environment of a trainer subprocess."""
    e = dict(os.environ, OMP_NUM_THREADS="1")
    e.pop("TRITON_INTERPRET", None)  # the kernels' twins: the same results, without the interpreter's cost
    return e


def read(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a: dict, b: dict) -> None:
    """Two checkpoints hold the same student, teacher, momentum buffers, choice generator and step, bit for bit."""
    for key in ("student", "teacher"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), f"{key}.{name} differs"
    for i, s in a["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"]), f"momentum {i}"
    assert torch.equal(a["rng"][0]["choices"], b["rng"][0]["choices"]) and a["step"] == b["step"]


STEPS = 16  # the watched run's length
PROGRESS = re.compile(r"\] step (\d+)/\d+ ")
STOPPED = re.compile(r"stopped by (SIG\w+): at step (\d+) of")


def watched_args(root: str, out: str, *extra: str) -> list[str]:
    """A progress line every step, an evaluation every 3 steps, a checkpoint every 2 (overridable), no images."""
    return tiny_args(root, out, STEPS, "train.log_every=1", "train.eval_every=3", "train.checkpoint_every=2",
                     "--image-every", "0", "--no-tensorboard", "--keep-last", "2", *extra)


class Watched:
    """A trainer subprocess whose stdout is read line by line as it comes, so that a signal is sent at a chosen
    moment (after a given progress line), not after a fixed sleep; stderr goes to a file."""

    def __init__(self, cmd: list[str], err_path: str, timeout_s: float = 200, new_session: bool = False) -> None:
        self.err_path = err_path
        with open(err_path, "w") as err:  # new_session: its own process group, as a scheduler's job step
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=err, text=True,
                                         bufsize=1, start_new_session=new_session)
        self._timer = threading.Timer(timeout_s, self.proc.kill)  # a hung run fails the test instead of hanging it
        self._timer.start()
        self.out: list[str] = []

    def until(self, wanted: Callable[[int | None, str], bool]) -> int | None:
        """Read lines until `wanted(progress step or None, line)`; returns that line's step (None: the run ended,
        or the line was not a progress line)."""
        for line in self.proc.stdout:
            self.out.append(line)
            m = PROGRESS.search(line)
            step = int(m.group(1)) if m else None
            if wanted(step, line):
                return step
        raise AssertionError("the run ended before the awaited line:\n" + "".join(self.out[-20:]))

    def finish(self) -> tuple[int, str, str]:
        """Wait for the end: (return code, stdout, stderr)."""
        self.out.append(self.proc.stdout.read())
        code = self.proc.wait()
        self._timer.cancel()
        with open(self.err_path) as f:
            return code, "".join(self.out), f.read()


@functools.cache
def _uninterrupted(root: str, out: str) -> str:
    proc = subprocess.run(TRAIN + watched_args(root, out), cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return os.path.join(out, f"ckpt_{STEPS:08d}.pt")


def uninterrupted_checkpoint(root: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The final checkpoint of the uninterrupted run of watched_args (trained once per session, shared by
    the interrupt tests)."""
    return _uninterrupted(root, str(tmp_path_factory.getbasetemp() / "uninterrupted"))
