"""The class -> images index used by the long-tail paste: for each class, the images whose label contains it.

Built once by reading every label (in worker processes: GTA5 has ~25k labels) and cached as JSON beside the
data. The cache holds a fingerprint of the label files (name, size, mtime), so it is rebuilt when they change,
and is written to a temp file then renamed, so a crash never leaves half a cache that parses.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import os
import sys
import warnings
from typing import Any

import numpy as np
from tqdm import tqdm

from dsp_fast.atomic_io import atomic_write
from dsp_fast.data.datasets import SegmentationDataset
from dsp_fast.data.errors import DatasetError
from dsp_fast.data.labels import IGNORE_LABEL

_FORMAT = 1  # bump when the cache's content changes meaning
_PARALLEL_MIN_IMAGES = 256  # below this, starting worker processes costs more than it saves


def default_cache_path(dataset: SegmentationDataset, num_classes: int) -> str:
    """`<root>/.dsp_class_index_<name>[_<split>]_<num_classes>.json`; the split keeps Cityscapes splits apart."""
    split = getattr(dataset, "split", "")
    tag = f"{dataset.name}_{split}" if split else dataset.name
    return os.path.join(dataset.root, f".dsp_class_index_{tag}_{num_classes}.json")


def _fingerprint(dataset: SegmentationDataset) -> str:
    """Digest of every label file's path (relative to the root), size and mtime, in index order."""
    digest = hashlib.sha256()
    for path in dataset.label_paths:
        try:
            st = os.stat(path)
        except OSError as e:
            raise DatasetError(f"{path}: cannot stat label file ({e})") from None
        digest.update(f"{os.path.relpath(path, dataset.root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _classes_in(dataset: SegmentationDataset, i: int, num_classes: int) -> list[int]:
    label = dataset.read_label(i)
    counts = np.bincount(label.ravel(), minlength=IGNORE_LABEL + 1)
    if len(counts) > IGNORE_LABEL + 1 or counts[num_classes:IGNORE_LABEL].any():
        raise DatasetError(f"{dataset.label_paths[i]}: ids outside 0..{num_classes - 1} (and not {IGNORE_LABEL})")
    return np.flatnonzero(counts[:num_classes]).tolist()


_worker_dataset: SegmentationDataset | None = None  # set once per worker process, so tasks carry only an index


def _init_worker(dataset: SegmentationDataset) -> None:
    global _worker_dataset
    _worker_dataset = dataset


def _worker_classes_in(i: int, num_classes: int) -> list[int]:
    assert _worker_dataset is not None
    return _classes_in(_worker_dataset, i, num_classes)


def _build(dataset: SegmentationDataset, num_classes: int, workers: int) -> list[list[int]]:
    index: list[list[int]] = [[] for _ in range(num_classes)]
    bar = dict(total=len(dataset), desc=f"class index {dataset.name}", unit="img", disable=not sys.stderr.isatty())
    if workers > 1 and len(dataset) >= _PARALLEL_MIN_IMAGES:
        # spawn, not fork: the caller may hold threads (torch, DataLoader) that fork would copy in a bad state.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(dataset,)) as pool:
            task = functools.partial(_worker_classes_in, num_classes=num_classes)
            results = list(tqdm(pool.imap(task, range(len(dataset)), chunksize=16), **bar))
    else:
        results = [_classes_in(dataset, i, num_classes) for i in tqdm(range(len(dataset)), **bar)]
    for i, present in enumerate(results):
        for c in present:
            index[c].append(i)  # i increases, so every list is sorted
    return index


def _read_cache(path: str, fingerprint: str, num_classes: int, num_images: int) -> list[list[int]] | None:
    try:
        with open(path) as f:
            data: Any = json.load(f)
    except (OSError, ValueError):
        return None  # absent or unreadable: rebuild
    if not isinstance(data, dict) or data.get("format") != _FORMAT or data.get("fingerprint") != fingerprint:
        return None
    index = data.get("index")
    if data.get("num_images") != num_images or not isinstance(index, list) or len(index) != num_classes:
        return None
    return [list(map(int, ids)) for ids in index]


def _write_cache(path: str, payload: dict[str, Any]) -> None:
    try:
        atomic_write(path, json.dumps(payload))
    except OSError as e:
        # A read-only dataset folder should not stop training; the index is just rebuilt next time.
        warnings.warn(f"could not cache the class index at {path} ({e}); pass cache_path to a writable place",
                      stacklevel=3)


def load_or_build_class_index(dataset: SegmentationDataset, num_classes: int, cache_path: str | None = None,
                              workers: int | None = None) -> list[list[int]]:
    """For each class 0..num_classes-1, the sorted indices of the images whose label contains it: read from
    `cache_path` (default `default_cache_path`) when its fingerprint matches the label files, else built from
    `dataset.read_label` and written there. workers: processes that read labels (default: up to 8 CPUs)."""
    if not dataset.label_paths:
        raise DatasetError(f"{dataset.root}: the {dataset.name} reader has no labels to index")
    path = cache_path or default_cache_path(dataset, num_classes)
    fingerprint = _fingerprint(dataset)
    cached = _read_cache(path, fingerprint, num_classes, len(dataset))
    if cached is not None:
        return cached
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    index = _build(dataset, num_classes, workers)
    _write_cache(path, {"format": _FORMAT, "dataset": dataset.name, "num_classes": num_classes,
                        "num_images": len(dataset), "fingerprint": fingerprint, "index": index})
    return index
