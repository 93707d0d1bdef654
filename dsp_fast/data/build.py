"""Datasets named by a config: the real readers on the configured roots, or the built-in synthetic shift."""

from __future__ import annotations

from dsp_fast.config import Config
from dsp_fast.data.datasets import GTA5, SYNTHIA, Cityscapes
from dsp_fast.data.synthetic import ensure_synthetic


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
