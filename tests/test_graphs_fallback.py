"""GraphedStep's fallback on a CPU: a capture that fails leaves the process clean (the caller's stream current
again, the capture ended, the graph's pool dropped) and the step still runs, eagerly. torch.cuda is replaced by a
stand-in that behaves as torch.cuda.graph does on a failed capture: its exit raises before it restores the stream.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from dsp_fast.engine import graphs


class StandInCuda:
    """The torch.cuda calls GraphedStep makes, with the state a failed capture would leave behind."""

    def __init__(self) -> None:
        self.current = "default"
        self.capturing = False
        self.calls: list[str] = []
        outer = self

        class Stream:
            def __init__(self, name: str = "side") -> None:
                self.name = name

            def wait_stream(self, other) -> None:
                pass

        class Graph:
            def capture_end(self) -> None:
                outer.calls.append("capture_end")
                outer.capturing = False

            def reset(self) -> None:
                outer.calls.append("reset")

            def replay(self) -> None:
                outer.calls.append("replay")

        self.Stream, self.CUDAGraph = Stream, Graph

    def current_stream(self):
        return self.Stream(self.current)

    def set_stream(self, stream) -> None:
        self.current = stream.name

    @contextlib.contextmanager
    def stream(self, s):
        saved, self.current = self.current, s.name
        yield
        self.current = saved

    @contextlib.contextmanager
    def graph(self, g, capture_error_mode: str = "global"):
        self.current, self.capturing = "capture", True
        yield  # an exception in the body propagates here; like torch's, the exit fails before restoring
        self.capturing = False
        self.current = "default"

    def is_current_stream_capturing(self) -> bool:
        return self.capturing

    def synchronize(self) -> None:
        pass

    def empty_cache(self) -> None:
        self.calls.append("empty_cache")


@pytest.fixture
def cuda(monkeypatch) -> StandInCuda:
    fake = StandInCuda()
    for name in ("Stream", "CUDAGraph", "current_stream", "set_stream", "stream", "graph",
                 "is_current_stream_capturing", "synchronize", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    return fake


def test_failed_capture_restores_the_stream_and_trains_eagerly(cuda):
    ran, messages = [], []

    def step() -> None:
        if cuda.capturing:
            raise RuntimeError("operation not permitted when stream is capturing")
        ran.append(cuda.current)

    runner = graphs.GraphedStep(step, warmup=2, on_fallback=messages.append)
    for _ in range(4):
        runner()
    assert ran == ["side"] * 4  # two warm-up steps, the step whose capture failed, and one more: all eager
    assert runner.eager_only and runner.graph is None
    assert cuda.current == "default" and not cuda.capturing
    assert cuda.calls == ["capture_end", "reset", "empty_cache"]  # the capture ended, the graph's pool dropped
    assert len(messages) == 1 and "operation not permitted" in messages[0]


def test_successful_capture_replays(cuda):
    ran = []
    runner = graphs.GraphedStep(lambda: ran.append(cuda.current), warmup=1)
    for _ in range(3):
        runner()
    assert ran == ["side", "capture"]  # one warm-up step, then the capture records the step once
    assert cuda.calls == ["replay", "replay"] and cuda.current == "default"
