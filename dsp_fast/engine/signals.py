"""SIGINT, SIGTERM and SIGUSR1 during a fast run: stop at a step boundary with a checkpoint, or checkpoint and go on
(docs/training.md, "Stopping a run: signals").

The handler only records the request; the loop (engine/loop.py) answers it at the next step boundary, where every
rank agrees (distributed.agree_max). Outside the training steps nothing is pending that a checkpoint would keep, so
a stop signal there raises `StopRequested` at once. A second stop signal more than `repeat_window_s` after the first
kills the process; one within the window is the same request delivered twice (SLURM signals every process of a job
step, and torchrun forwards its agent's signal to workers that may have had it already).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
CHECKPOINT_SIGNAL = signal.SIGUSR1


class StopRequested(BaseException):
    """The run stopped on a signal. A BaseException, as KeyboardInterrupt is: the broad `except Exception` of
    cleanup code must not swallow it. `resume_dir`: the run folder to continue (None: no checkpoint to continue),
    filled in by engine/job.py."""

    def __init__(self, signum: int, where: str) -> None:
        super().__init__(where)
        self.signum, self.where = int(signum), where
        self.resume_dir: str | None = None
        self.resume_command = ""

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as shells report a process it killed (130 for SIGINT, 143 for SIGTERM): a job
        script reads the same code whether the run stopped cleanly or not."""
        return 128 + self.signum

    def report(self) -> str:
        """What the user reads: which signal, where the run stopped, and how to continue it."""
        head = f"stopped by {signal.Signals(self.signum).name}: {self.where}"
        if not self.resume_command:
            return f"{head}\nno checkpoint to continue from: run the same command again to start over"
        return f"{head}\nresume with: {self.resume_command}"


class StopSignals:
    """The process's handlers for the span of a `with` block (the previous handlers restored after it). `armed()`
    marks the training steps, where a stop signal waits for the next step boundary."""

    def __init__(self, announce: bool = True, repeat_window_s: float = 1.0) -> None:
        self.announce, self.repeat_window_s = announce, repeat_window_s
        self.stop_signum = 0
        self.checkpoint_asked = False
        self._first_at = 0.0
        self._armed = False
        self._saved: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal.signal works in the main thread only
            for sig in (*STOP_SIGNALS, CHECKPOINT_SIGNAL):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._saved.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._saved.clear()

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        """The training steps: a stop signal is answered at the next step boundary. One that came after the last
        boundary's answer stops the run on leaving the block."""
        self._armed = True
        try:
            yield
        finally:
            self._armed = False
        if self.stop_signum:
            raise StopRequested(self.stop_signum, "after the last training step, before the final evaluation")

    def take_checkpoint_request(self) -> bool:
        """Whether a SIGUSR1 asked for a checkpoint since the last call (and forget it)."""
        asked, self.checkpoint_asked = self.checkpoint_asked, False
        return asked

    def _say(self, text: str) -> None:
        if self.announce:  # os.write, not print: a handler that prints while print runs raises "reentrant call"
            os.write(2, f"\n[signal] {text}\n".encode())

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if signum == CHECKPOINT_SIGNAL:
            self.checkpoint_asked = True
            self._say(f"{name}: a checkpoint at the next step boundary; the run goes on")
            return
        now = time.monotonic()
        if self.stop_signum:
            if now - self._first_at < self.repeat_window_s:
                return  # the first request, delivered again (SLURM and torchrun both signal the workers)
            self._say(f"{name} again: stopping at once, without a checkpoint")
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.stop_signum, self._first_at = signum, now
        if not self._armed:
            self._say(f"{name}: stopping (outside the training steps: nothing new to save)")
            raise StopRequested(signum, "outside the training steps (nothing trained since the last checkpoint)")
        self._say(f"{name}: stopping after the step in flight, with a checkpoint (a second signal stops at once)")
