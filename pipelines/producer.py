"""A background thread that keeps the next steps' batches ready while the current step runs.

The loader is step-indexed (every choice is a function of (seed, rank, step)), so reading ahead changes nothing:
one thread calls the loader in order, the batches are the same tensors as read on demand, and a checkpoint that
records the steps consumed loses no batch (those read ahead are read again by the resumed run's loader). PIL and
numpy release the GIL while they decode and copy, so the thread overlaps the step's operators.

On CUDA the thread issues its host -> device copies on a side stream; the consumer's stream waits for them with an
event, so the copy of step t+1 runs beside step t's kernels instead of after them.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable

import torch

_POLL_S = 0.1  # how often a blocked put / get looks at the stop flag and the thread's health


class _End:
    """The producer's last word: the exception it hit (re-raised in the consumer), or StopIteration."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Producer:
    """Calls `read` (the next step's batch, a dict of tensors on `device`) on a daemon thread, `depth` batches
    ahead. An error of `read` (a bad file) is raised by the `next()` that would have returned that step's batch, as
    the same exception; `close()` stops the thread once the batch it is reading is done."""

    def __init__(self, read: Callable[[], dict[str, torch.Tensor]], depth: int, device: torch.device) -> None:
        if depth < 1:
            raise ValueError(f"a producer keeps at least one batch ready, got depth {depth}")
        if device.type == "cuda" and device.index is None:  # set_device in the thread wants an index
            device = torch.device("cuda", torch.cuda.current_device())
        self.read, self.device = read, device
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._end: _End | None = None
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._thread = threading.Thread(target=self._produce, name="dsp_fast-data-producer", daemon=True)
        self._thread.start()

    def __iter__(self) -> Producer:
        return self

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            if self._stream is not None:
                torch.cuda.set_device(self.device)  # the current device is per thread: a rank's own GPU
            with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
                while not self._stop.is_set():
                    batch = self.read()
                    ready = None
                    if self._stream is not None:
                        ready = torch.cuda.Event()
                        ready.record(self._stream)
                    if not self._put((batch, ready)):
                        return
        except BaseException as e:  # every failure, StopIteration included, reaches the consumer
            self._put(_End(e))

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._end is not None:
            raise self._end.error
        if self._stop.is_set():
            raise StopIteration
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the data producer thread ended without a batch or an error") from None
        if isinstance(item, _End):
            self._end = item
            raise item.error
        batch, ready = item
        if ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(ready)
            for t in batch.values():
                t.record_stream(stream)  # freed by the allocator only once the step's stream is past its use
        return batch

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the thread: it finishes the batch it is reading, then sees the flag (a daemon: never holds up the
        interpreter's exit, even past `timeout_s`)."""
        self._stop.set()
        self._drain()  # a producer blocked on a full queue sees the flag within _POLL_S either way
        self._thread.join(timeout_s)
        self._drain()  # what it put meanwhile: the batches' memory is freed now, not with the loader

    def _drain(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
