"""The trainer's data: prepared folders (the built-in synthetic shift is prepared here, once, and cached) and the
step-indexed loader of `dsp_fast.pipelines`.

Rank 0 prepares; the other ranks wait for its answer (the folders, or the error it hit), so a bad dataset stops
every rank with the same message instead of leaving them in a barrier.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator

from dsp_fast.config import Config
from dsp_fast.data import GTA5, Cityscapes, DatasetError, ensure_synthetic
from dsp_fast.engine.distributed import DistInfo, broadcast_object
from dsp_fast.engine.options import FastOptions
from dsp_fast.pipelines.prepared import FORMAT_VERSION

PREPARED_SUBDIR = "prepared"
PREPARE_HINT = ("prepare the data once with `python -m dsp_fast.prepare` (see its --help), then pass "
                "--prepared-source DIR --prepared-target DIR/train")


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """An exclusive lock between processes of this machine (a test and the main job may prepare at once)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _is_prepared(out: str, count: int) -> bool:
    try:
        with open(os.path.join(out, "manifest.json")) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return False
    return len(m.get("stems", [])) == count and not m.get("rejects")


def _prepare_one(dataset, out: str, name: str, split: str | None, root: str, size: tuple[int, int],
                 num_classes: int, labels: bool, **long_tail) -> None:
    from dsp_fast import prepare  # prepare pulls tqdm and process pools: only when there is work to do

    if _is_prepared(out, len(dataset)):
        return
    # PNG: lossless, so the fast trainer sees the pixels the reference trainer crops from the same files.
    options = prepare.Options(name, split, os.path.abspath(root), tuple(size), "png", 95, num_classes, labels,
                              prepare.RESAMPLE[name], **long_tail)
    summary = prepare.prepare_set(dataset, out, options, workers=min(4, os.cpu_count() or 1), progress=False)
    print(summary.report(), flush=True)
    if summary.rejects:
        raise DatasetError(f"{out}: {len(summary.rejects)} synthetic images could not be prepared (rejects.txt)")


def prepare_synthetic(cfg: Config) -> tuple[str, str]:
    """(prepared source, prepared target train split) of the synthetic shift, under <synthetic_root>/prepared/."""
    d = cfg.data
    gta5_root, cs_root = ensure_synthetic(d.synthetic_root, seed=d.synthetic_seed)
    base = os.path.join(os.path.abspath(d.synthetic_root), PREPARED_SUBDIR)
    (sw, sh), (tw, th), (lw, lh), (cw, ch) = d.source_size, d.target_size, cfg.dsp.long_tail_size, d.crop_size
    classes = tuple(cfg.dsp.long_tail_classes)
    # the folder names every option that changes its bytes, and the format version (a different config or an older
    # preparation left in synthetic_root gets a new folder, never an error)
    v = FORMAT_VERSION
    src_out = os.path.join(base, f"gta5_{sw}x{sh}_png_v{v}_lt{lw}x{lh}_crop{cw}x{ch}_c{'-'.join(map(str, classes))}")
    tgt_out = os.path.join(base, f"cityscapes_{tw}x{th}_png_v{v}", "train")
    with _file_lock(os.path.join(base, ".lock")):
        _prepare_one(GTA5(gta5_root), src_out, "gta5", None, gta5_root, d.source_size, 19, True,
                     long_tail_classes=classes, long_tail_size=(lw, lh), crop=(cw, ch))
        target = Cityscapes(cs_root, "train", num_classes=cfg.model.num_classes, labels=False)
        _prepare_one(target, tgt_out, "cityscapes", "train", cs_root, d.target_size, cfg.model.num_classes, False)
    return src_out, tgt_out


def prepared_dirs(cfg: Config, opts: FastOptions, info: DistInfo) -> tuple[str, str]:
    """The prepared (source, target) folders the loader reads; prepared on rank 0 for the synthetic shift."""
    if opts.prepared_source or opts.prepared_target:
        if not (opts.prepared_source and opts.prepared_target):
            raise DatasetError("--prepared-source and --prepared-target go together")
        return opts.prepared_source, opts.prepared_target
    if cfg.data.source != "synthetic":
        raise DatasetError(f"data.source {cfg.data.source!r}: the fast trainer reads prepared data; {PREPARE_HINT}")
    answer: tuple[str, object] | None = None
    if info.is_main:
        try:
            answer = ("ok", prepare_synthetic(cfg))
        except (DatasetError, OSError, SystemExit) as e:
            answer = ("error", f"preparing the synthetic dataset failed: {e}")
    answer = broadcast_object(answer, info)
    if answer[0] == "error":
        raise DatasetError(str(answer[1]))
    return tuple(answer[1])  # type: ignore[return-value]


def resolve_backend(opts: FastOptions, info: DistInfo) -> str:
    """'auto': DALI where it can decode on the GPU and imports; the torch backend otherwise."""
    if opts.data_backend != "auto":
        return opts.data_backend
    if info.device.type == "cuda":
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            return "torch"
        return "dali"
    return "torch"


def build_step_loader(cfg: Config, opts: FastOptions, info: DistInfo, dirs: tuple[str, str], start_step: int):
    """The per-step batches of this rank from `start_step` on (the loader is step-indexed: resuming is exact)."""
    from dsp_fast.pipelines import build_loaders

    threads = opts.data_threads if opts.data_threads >= 0 else cfg.data.num_workers
    return build_loaders(dirs[0], dirs[1], crop_size=cfg.data.crop_size, batch_size=cfg.data.batch_size,
                         backend=resolve_backend(opts, info), device=info.device, rank=info.rank,
                         world_size=info.world_size, seed=cfg.train.seed, num_threads=threads,
                         long_tail_classes=cfg.dsp.long_tail_classes,
                         num_long_tail=cfg.dsp.num_long_tail if cfg.dsp.enabled else 0, start_step=start_step)
