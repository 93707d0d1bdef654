"""`build_loaders`: the per-step data of the fast trainer, from prepared folders, with a switchable backend.

Legend: B = batch_size (per domain), L = long-tail classes per step, H, W = crop height and width.
"""

from __future__ import annotations

import atexit
import weakref
from collections.abc import Sequence

import torch

from dsp_fast.config import LOADER_BACKENDS as BACKENDS  # one home, which fast.data_backend's choices derive from

from .pixels import decoded_mib
from .plan import Planner
from .prepared import PreparedSet, load_prepared
from .producer import Producer

STEP_KEYS = ("src_img", "src_label", "tmpl_img", "tmpl_label", "lt_img", "lt_label", "lt_class", "tgt_img")


# Loaders not closed when the interpreter exits are closed before it finalizes: a producer thread still running
# then would abort the process, and DataLoader workers (they ignore SIGTERM) would hold up multiprocessing's exit.
_OPEN: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_loaders() -> None:
    for loader in list(_OPEN):
        loader.close()


def _nchw(images_NHWC: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) -> (N, 3, H, W) channels_last: a view for DALI and torch outputs (already NHWC in memory)."""
    return images_NHWC.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


class StepLoader:
    """Endless iterator over training steps. `next(loader)` returns a dict of tensors on `device`:

        src_img, tmpl_img  (B, 3, H, W) uint8, channels_last    source batch and template batch (no tmpl_* keys
        src_label, tmpl_label (B, H, W) uint8                  without a template); train ids, 255 = ignore
        lt_img (B*L, 3, H, W) uint8, lt_label (B*L, H, W) uint8 long-tail crops: crop b*L + l is template b's
                                                               crop of class lt_class[l] (it holds that class)
        lt_class (L,) int64                                    L = min(num_long_tail, classes present), fixed
        tgt_img (B, 3, H, W) uint8, channels_last              target batch

    Everything random (images, windows, flips, long-tail classes) is planned on the host from (seed, rank, step)
    and prefetched by the backend, so the choice never waits on the GPU and a run resumed at `start_step`
    continues the same sequence. Images stay uint8: the trainer converts and normalises on the device.
    `producer` > 0: a background thread reads that many steps ahead (producer.py); the same batches."""

    def __init__(self, planner: Planner, source, target, long_tail, device: torch.device, producer: int = 0,
                 in_memory: dict[str, str] | None = None) -> None:
        self.planner, self.source, self.target, self.long_tail, self.device = planner, source, target, long_tail, device
        self.in_memory = in_memory or {}  # set name -> 'held' or why not (pixels.py); empty for DALI
        self._producer = Producer(self._read, producer, device) if producer > 0 else None
        _OPEN.add(self)

    def __iter__(self) -> StepLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self._read() if self._producer is None else next(self._producer)

    def _read(self) -> dict[str, torch.Tensor]:
        s_img, s_label, _ = next(self.source)
        t_img, _, _ = next(self.target)
        s_img, b = _nchw(s_img), self.planner.batch_size
        if self.long_tail is not None:
            lt_img, lt_label, lt_plan = next(self.long_tail)
            lt_img, classes = _nchw(lt_img), lt_plan.classes
        else:  # no long-tail crops: empty tensors of the right shapes
            lt_img, lt_label, classes = s_img[:0], s_label[:0], []
        template = {"tmpl_img": s_img[b:2 * b], "tmpl_label": s_label[b:2 * b]} if self.planner.template else {}
        return {"src_img": s_img[:b], "src_label": s_label[:b], **template, "lt_img": lt_img, "lt_label": lt_label,
                "lt_class": torch.tensor(classes, dtype=torch.int64).to(self.device, non_blocking=True),
                "tgt_img": _nchw(t_img)}

    def close(self) -> None:
        _OPEN.discard(self)
        if self._producer is not None:  # first: the thread reads the streams
            self._producer.close()
        for stream in (self.source, self.target, self.long_tail):
            if stream is not None:
                stream.close()


def build_loaders(source_dir: str, target_dir: str, *, crop_size: tuple[int, int] = (512, 512), batch_size: int = 2,
                  backend: str = "dali", device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1,
                  seed: int = 0, num_threads: int = 4, long_tail_classes: Sequence[int] = (), num_long_tail: int = 0,
                  flip: bool = False, start_step: int = 0, prefetch: int = 2, dali_roi: bool = True,
                  template: bool = True, producer: int = 0, cache_mib: float = 0) -> StepLoader:
    """The step loader over prepared folders (`python -m dsp_fast.prepare`).

    source_dir: a prepared GTA5 / SYNTHIA folder (with labels); target_dir: a prepared Cityscapes split folder.
    crop_size: (width, height). batch_size: images per domain per step, per rank.
    backend: one of BACKENDS. device: where the tensors land ('cuda' makes DALI decode JPEGs on the GPU).
    rank, world_size: DDP sharding (each rank its own part of every epoch, reshuffled per epoch; see plan.py).
    num_threads: DALI CPU threads, or DataLoader workers, per stream (source side and target side each).
    long_tail_classes, num_long_tail: the classes long-tail crops are drawn from, and how many per step.
    flip: random horizontal flips (False: the reference trainer does none). start_step: resume point.
    prefetch: steps prepared ahead (DALI's queue depth; the DataLoader's prefetch_factor per worker).
    dali_roi: DALI decodes only each crop's window (the same pixels; False: whole file, then slice, for benchmarks).
    template: a second source batch per step (tmpl_img, tmpl_label); False (dsp.template 'source'): none read.
    producer: steps a background thread keeps ready (0: none; read when asked). DALI ignores it: its own threads
    decode `prefetch` steps ahead.
    cache_mib: the torch backend decodes each set (source, target, long-tail, in that order) whose decoded pixels
    fit what is left of this budget once, now, and crops it from memory (pixels.py); 0: every read decodes."""
    if backend not in BACKENDS:
        raise ValueError(f"data backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available")
    if batch_size < 1 or num_threads < 0 or producer < 0 or cache_mib < 0:
        raise ValueError(f"batch_size must be >= 1, num_threads, producer and cache_mib >= 0, got {batch_size}, "
                         f"{num_threads}, {producer} and {cache_mib}")
    source, target = load_prepared(source_dir), load_prepared(target_dir)
    long_tail = load_prepared(source.long_tail) if source.long_tail and num_long_tail > 0 else None
    crop = (int(crop_size[0]), int(crop_size[1]))
    planner = Planner(source, target, crop, batch_size, rank, world_size, seed, tuple(long_tail_classes),
                      num_long_tail, flip, long_tail, template)
    sets = {"source": (source, True), "target": (target, False)}  # (set, read with labels)
    if planner.num_long_tail > 0:
        assert long_tail is not None  # the planner checked it
        sets["long-tail"] = (long_tail, True)
    in_memory = held_in_memory(sets, cache_mib) if backend == "torch" else {}
    if backend == "dali":
        from .dali_backend import DaliCropStream as Stream

        kwargs = {"num_threads": max(1, num_threads), "roi": dali_roi}
    else:
        from .torch_backend import TorchCropStream as Stream

        kwargs = {"num_threads": num_threads, "gpu_decode": backend == "torchvision"}

    def stream(name: str, plan_fn):
        ds, labels = sets[name]
        memory = {"in_memory": in_memory[name] == "held"} if in_memory else {}
        return Stream(ds, plan_fn, crop, labels, device, start_step=start_step, prefetch=prefetch, **kwargs, **memory)

    src, tgt = stream("source", planner.source_plan), stream("target", planner.target_plan)
    lt = stream("long-tail", planner.long_tail_plan) if "long-tail" in sets else None
    return StepLoader(planner, src, tgt, lt, device, producer=0 if backend == "dali" else producer,
                      in_memory=in_memory)


def held_in_memory(sets: dict[str, tuple[PreparedSet, bool]], cache_mib: float) -> dict[str, str]:
    """Which sets the torch backend decodes once and holds: {name: 'held' or why not}, in the order given, each
    set (with its labels if read with them) whole or not at all, within `cache_mib` MiB together."""
    left, answer = cache_mib, {}
    for name, (ds, labels) in sets.items():
        need = decoded_mib(ds, labels)
        if need <= left:
            answer[name], left = "held", left - need
        else:
            answer[name] = f"{need:.1f} MiB decoded, {left:.1f} MiB of the budget left"
    return answer
