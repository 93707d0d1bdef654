"""CUDA-graph capture of the training step (`fast.cuda_graphs`, `fast.graph_warmup`).

The first `warmup` steps run eagerly on a side stream (real steps: cuDNN picks its algorithms, the gradients are
allocated and DDP rebuilds its buckets, about 11 iterations); the next call captures the step and replays it, later
calls only replay. The step reads the static buffers and the lr / step / flag tensors the caller fills in place. A
capture that fails is reported, undone cleanly (stream restored, graph pool freed) and the run continues eagerly.
`tests/test_train_step.py` compares eager and graphed; `tests/test_step_capturable.py` shows the step issues no sync.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.distributed as dist


class GraphedStep:
    """Call it like the step function it wraps; `fn` takes no arguments (a closure over the static buffers)."""

    def __init__(self, fn: Callable[[], None], warmup: int, on_fallback: Callable[[str], None] = print) -> None:
        self.fn, self.warmup, self.on_fallback = fn, warmup, on_fallback
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_only = False
        self._side = torch.cuda.Stream()

    def __call__(self) -> None:
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
        elif self.eager_only or self.calls <= self.warmup:
            self._eager()
        elif self._capture():
            self.graph.replay()  # capture records without running: this step still has to happen
        else:
            self._eager()

    def _eager(self) -> None:
        self._side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._side):
            self.fn()
        torch.cuda.current_stream().wait_stream(self._side)

    def _capture(self) -> bool:
        torch.cuda.synchronize()
        graph, reason = torch.cuda.CUDAGraph(), ""
        stream = torch.cuda.current_stream()
        try:
            # thread_local: DALI's worker threads may call CUDA during the capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.fn()
        except Exception as e:  # noqa: BLE001 - any capture failure means: keep training eagerly, say why
            reason = f"{type(e).__name__}: {e}"
            _abandon_capture(graph, stream)
        if not _all_ranks_agree(not reason):  # one rank replaying collectives while another runs eagerly would hang
            self.eager_only = True
            self.on_fallback(f"CUDA graph capture failed ({reason or 'on another rank'}); continuing eagerly")
            return False
        self.graph = graph
        return True


def _abandon_capture(graph: torch.cuda.CUDAGraph, stream: torch.cuda.Stream) -> None:
    """Leave the process as it was before a failed capture. torch.cuda.graph can raise from its exit (capture_end
    on an invalidated capture) before it restores the stream: the capture stream would stay current, still
    capturing, and every later kernel would be recorded into a dead graph instead of running. End the capture if
    it is still open, make the caller's stream current again, and free the graph's private memory pool."""
    if torch.cuda.is_current_stream_capturing():
        with contextlib.suppress(Exception):  # the capture is invalid: ending it is all that is wanted
            graph.capture_end()
    torch.cuda.set_stream(stream)
    with contextlib.suppress(Exception):
        graph.reset()  # drops the captured graph and its memory pool
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def _all_ranks_agree(ok: bool) -> bool:
    """True when `ok` holds on every rank (once, at capture time: the host read is harmless there)."""
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    flag = torch.tensor([1 if ok else 0], device="cuda")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
