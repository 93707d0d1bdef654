"""Host-side planning of every random choice of the data streams: which images, which crop windows, which flips,
which long-tail classes and crops (step 3: the authors' retry-loop distribution without the loop, from the window
counts and maps stored at preparation, `dsp_fast.data.windows`). Numpy, shared by all backends: the same (seed,
rank, step) gives the same plan, so DALI and torch give the same crops and a resumed run continues the sequence.

Sharding: each stream walks an endless sequence of per-epoch permutations (seed + stream + epoch); position g goes
to rank g % world_size, so within every epoch each sample goes to exactly one rank, once. When world_size does not
divide the dataset, the ranks' epoch boundaries are offset by one sample at most.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dsp_fast.data.windows import draw_in_box

from .prepared import PreparedSet, read_window_map

STREAM_SOURCE, STREAM_TEMPLATE, STREAM_TARGET = 0, 1, 2
SIDE_SOURCE, SIDE_TARGET, SIDE_LONG_TAIL = 0, 1, 2


class ShardedSampler:
    """Sample indices of one stream for one rank: `at(k)` is the rank's k-th sample (O(1), so resuming is free)."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, seed: int = 0, stream: int = 0) -> None:
        if n < 1:
            raise ValueError(f"cannot sample from an empty dataset (n={n})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.n, self.rank, self.world_size, self.seed, self.stream = n, rank, world_size, seed, stream
        self._perms: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a step spans at most two epochs
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, self.stream, epoch]).permutation(self.n)
        return self._perms[epoch]

    def at(self, k: int) -> int:
        g = k * self.world_size + self.rank
        return int(self.permutation(g // self.n)[g % self.n])

    def take(self, start: int, count: int) -> list[int]:
        return [self.at(k) for k in range(start, start + count)]

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's share of `epoch` (the global positions epoch*n .. epoch*n+n-1 that fall to this rank)."""
        g = np.arange(epoch * self.n, (epoch + 1) * self.n)
        return self.permutation(epoch)[(g % self.n)[g % self.world_size == self.rank]]


def random_window(rng: np.random.Generator, size: tuple[int, int], crop: tuple[int, int]) -> tuple[int, int]:
    """Top-left (y0, x0) of a uniformly random crop window (the reference's RandomCrops); size and crop are (w, h)."""
    (w, h), (cw, ch) = size, crop
    x0 = int(rng.integers(0, w - cw + 1))  # x before y: the draw order every plan made so far was built on
    y0 = int(rng.integers(0, h - ch + 1))
    return y0, x0


@dataclasses.dataclass
class CropPlan:
    """The crops one pipeline produces in one step: image index, window top-left (y0, x0) and flip per crop."""

    indices: list[int]
    windows: list[tuple[int, int]]
    flips: list[bool]
    classes: list[int]  # long-tail plan only: the step's L classes; crop b*L + l is template b's crop of class l


class Planner:
    """Plans for every step of the source side (source + template crops; source crops alone without `template`,
    dsp.template 'source'), the long-tail crops (from the source set's longtail/ set, `long_tail`) and the target
    side."""

    def __init__(self, source: PreparedSet, target: PreparedSet, crop: tuple[int, int], batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, long_tail_classes: tuple[int, ...] = (),
                 num_long_tail: int = 0, flip: bool = False, long_tail: PreparedSet | None = None,
                 template: bool = True) -> None:
        for s in (source, target):
            if crop[0] > s.size[0] or crop[1] > s.size[1]:
                raise ValueError(f"crop {crop[0]}x{crop[1]} is larger than {s.root} ({s.size[0]}x{s.size[1]})")
        if not source.has_labels:
            raise ValueError(f"{source.root}: the source set was prepared without labels")
        self.source, self.target, self.crop, self.batch_size = source, target, tuple(crop), batch_size
        self.rank, self.seed, self.flip, self.template = rank, seed, flip, template
        streams = ((source, STREAM_SOURCE), (source, STREAM_TEMPLATE), (target, STREAM_TARGET))
        self.samplers = [ShardedSampler(len(ds), rank, world_size, seed, stream) for ds, stream in streams]
        bad = [c for c in long_tail_classes if not 0 <= c < source.num_classes]
        if bad:
            raise ValueError(f"long-tail classes {bad} are not train ids of {source.root} "
                             f"(0..{source.num_classes - 1})")
        self.long_tail = long_tail
        self.candidates: list[int] = []
        if num_long_tail > 0:
            if long_tail is None or long_tail.window_counts is None:
                raise ValueError(f"{source.root}: no longtail/ set; prepare the source again (python -m "
                                 "dsp_fast.prepare, without --no-long-tail) to draw long-tail crops")
            if tuple(long_tail.crop) != tuple(crop):
                raise ValueError(f"{long_tail.root}: windows counted for {long_tail.crop[0]}x{long_tail.crop[1]} "
                                 f"crops, data.crop_size is {crop[0]}x{crop[1]}; prepare again with --crop")
            missing = [c for c in long_tail_classes if c not in long_tail.long_tail_classes]
            if missing:
                raise ValueError(f"{long_tail.root}: dsp.long_tail_classes {missing} were not counted at "
                                 f"preparation ({long_tail.long_tail_classes}); prepare with --long-tail-classes")
            # As the reference: a class no source image holds is skipped, so every step has the same crop count.
            self.candidates = [c for c in long_tail_classes if long_tail.window_counts[:, c].sum() > 0]
        self.num_long_tail = min(num_long_tail, len(self.candidates))

    def _rng(self, step: int, side: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.rank, step, side])

    def _flips(self, rng: np.random.Generator, n: int) -> list[bool]:
        return [bool(f) for f in rng.integers(0, 2, n)] if self.flip else [False] * n

    def draw_long_tail(self, rng: np.random.Generator, cls: int) -> tuple[int, tuple[int, int]]:
        """(image of the longtail/ set, window top-left (y0, x0)) holding `cls`, with the retry loop's law."""
        assert self.long_tail is not None and self.long_tail.window_counts is not None
        counts = self.long_tail.window_counts[:, cls].astype(np.float64)
        i = int(rng.choice(len(counts), p=counts / counts.sum()))
        return i, draw_in_box(rng, *read_window_map(self.long_tail, i, cls))

    def long_tail_plan(self, step: int) -> CropPlan:
        """B*L crops of the longtail/ set: L distinct classes for the step, then each template image its own crop
        of each (image-major: crop b*L + l)."""
        rng = self._rng(step, SIDE_LONG_TAIL)
        classes = [self.candidates[p] for p in rng.permutation(len(self.candidates))[: self.num_long_tail]]
        indices, windows = [], []
        for _ in range(self.batch_size):
            for cls in classes:
                i, window = self.draw_long_tail(rng, cls)
                indices.append(i)
                windows.append(window)
        return CropPlan(indices, windows, self._flips(rng, len(indices)), classes)

    def source_plan(self, step: int) -> CropPlan:
        """Crops 0..B-1: source batch; B..2B-1: template batch (none without a template)."""
        b, rng = self.batch_size, self._rng(step, SIDE_SOURCE)
        indices = self.samplers[0].take(step * b, b) + (self.samplers[1].take(step * b, b) if self.template else [])
        windows = [random_window(rng, self.source.size, self.crop) for _ in indices]
        return CropPlan(indices, windows, self._flips(rng, len(indices)), [])

    def target_plan(self, step: int) -> CropPlan:
        b, rng = self.batch_size, self._rng(step, SIDE_TARGET)
        indices = self.samplers[2].take(step * b, b)
        windows = [random_window(rng, self.target.size, self.crop) for _ in indices]
        return CropPlan(indices, windows, self._flips(rng, b), [])
