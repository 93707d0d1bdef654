"""Datasets named by a config: the real readers on the configured roots, or the built-in synthetic shift; and the
start-up check of every configured root, split and layout, so a wrong path fails before the first step."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from dsp_fast.config import Config
from dsp_fast.data.datasets import GTA5, SYNTHIA, Cityscapes, SegmentationDataset
from dsp_fast.data.errors import DatasetError
from dsp_fast.data.synthetic import ensure_synthetic

LAYOUTS = {"gta5": ("images", "labels"), "synthia": ("RGB", "GT"), "cityscapes": ("leftImg8bit",)}  # top folders
_LAYOUT_WORDS = {"gta5": "GTA5 (images/, labels/)", "synthia": "SYNTHIA (RGB/, GT/LABELS/)",
                 "cityscapes": "Cityscapes (leftImg8bit/, gtFine/)"}


def dataset_roots(cfg: Config) -> tuple[str, str]:
    """(source root, Cityscapes root); generates the synthetic dataset on first use."""
    if cfg.data.source == "synthetic":
        return ensure_synthetic(cfg.data.synthetic_root, seed=cfg.data.synthetic_seed)
    return cfg.data.source_root, cfg.data.target_root


def source_dataset(cfg: Config) -> GTA5 | SYNTHIA:
    """The labelled source dataset (GTA5 layout for 'gta5' and 'synthetic', SYNTHIA layout for 'synthia')."""
    root, _ = dataset_roots(cfg)
    return SYNTHIA(root) if cfg.data.source == "synthia" else GTA5(root)


def target_dataset(cfg: Config, split: str, labels: bool) -> Cityscapes:
    """Cityscapes `split`, labels mapped to the model's classes (16 for a SYNTHIA model)."""
    _, root = dataset_roots(cfg)
    return Cityscapes(root, split, num_classes=cfg.model.num_classes, labels=labels)


def check_readable(dataset: SegmentationDataset, count: int = 0) -> None:
    """Read pairs 0..count-1 of `dataset` (0: all) as the evaluation does: a bad file stops the run before its first
    step (a DatasetError naming the first in index order). Threads: PIL and zlib decode without the GIL."""
    n = len(dataset) if count == 0 else min(count, len(dataset))

    def read(i: int) -> None:
        dataset[i]  # the pair decoded and checked, then dropped

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(read, range(n)))  # re-raises the first failure in index order


def detect_layout(root: str) -> str | None:
    """'gta5', 'synthia' or 'cityscapes' when `root` holds that layout's top-level folders, else None."""
    for name, folders in LAYOUTS.items():
        if all(os.path.isdir(os.path.join(root, f)) for f in folders):
            return name
    return None


def _check_layout(root: str, expected: str, field: str) -> None:
    """A clear error when `root` (the config field `field`) is missing or holds another dataset's layout."""
    if not os.path.isdir(root):
        raise DatasetError(f"{field}={root}: folder not found")
    found = detect_layout(root)
    if found == expected:
        return
    if found:
        what = f"a {_LAYOUT_WORDS[found]} folder (source and target roots swapped?)"
    else:
        what = f"none of the known layouts (it holds: {', '.join(sorted(os.listdir(root))[:8]) or 'nothing'})"
    raise DatasetError(f"{field}={root}: expected the {_LAYOUT_WORDS[expected]} layout, found {what}")


def check_data(cfg: Config, source: bool = True, target_train: bool = True, eval_split: bool = True) -> None:
    """Every root, split and layout the run will read, checked now (a DatasetError naming the config field and the
    path): the source and Cityscapes' train split as folders and file pairs (preparation reads their pixels and
    names every bad file), the labelled eval split decoded in full (nothing else reads it before training ends)."""
    d = cfg.data
    src_root, tgt_root = dataset_roots(cfg)
    fields = ("data.source_root", "data.target_root") if d.source != "synthetic" else ("data.synthetic_root",) * 2
    checks = []
    if source:
        kind = "synthia" if d.source == "synthia" else "gta5"
        checks.append((fields[0], lambda: _check_layout(src_root, kind, fields[0])))
        checks.append((fields[0], lambda: source_dataset(cfg)))
    checks.append((fields[1], lambda: _check_layout(tgt_root, "cityscapes", fields[1])))
    if target_train:
        checks.append((fields[1], lambda: Cityscapes(tgt_root, "train", num_classes=cfg.model.num_classes,
                                                     labels=False)))
    if eval_split:
        checks.append((f"data.eval_split={d.eval_split!r} of {fields[1]}",
                       lambda: check_readable(target_dataset(cfg, d.eval_split, True), d.max_eval_images)))
    for field, check in checks:
        try:
            check()
        except DatasetError as e:
            raise DatasetError(str(e) if str(e).startswith("data.") else f"{field}: {e}") from None
