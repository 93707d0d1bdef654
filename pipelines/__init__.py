"""dsp_fast.pipelines: the fast trainer's data loaders over prepared data (`python -m dsp_fast.prepare`).

    from dsp_fast.pipelines import build_loaders
    loader = build_loaders(prepared_gta5, prepared_cityscapes + "/train", backend="dali", device="cuda",
                           rank=rank, world_size=world, seed=seed, long_tail_classes=[12, 15, 16, 17, 18],
                           num_long_tail=2)
    batch = next(loader)  # dict: src_img, src_label, tmpl_img, tmpl_label, lt_img, lt_label, lt_class, tgt_img

Modules: `prepared` (the on-disk format), `plan` (host-side random choices, sharding), `dali_backend`,
`torch_backend`, `producer` (the read-ahead thread), `loader`, whose names are imported lazily: `dsp_fast.prepare`
imports neither torch nor DALI.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BACKENDS", "STEP_KEYS", "StepLoader", "build_loaders"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'dsp_fast.pipelines' has no attribute {name!r}")
