"""The trainer's data: every configured root checked at start-up, the prepared folders the loaders read (prepared once
into a cache, or given on the command line; docs/data.md, "Preparation" and "Bad files"), and the step-indexed
loader of `dsp_fast.pipelines`. The config's roots and sizes are the truth.

Rank 0 checks and prepares; the other ranks wait for its answer (the folders, or the error it hit), so a bad
dataset stops every rank with the same message instead of leaving them in a barrier.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from typing import Any

from dsp_fast.checkpoint_file import RunWriteError, data_write_error
from dsp_fast.config import Config, ConfigError, FastConfig
from dsp_fast.data import GTA5, SYNTHIA, Cityscapes, DatasetError
from dsp_fast.data.build import check_data, dataset_roots
from dsp_fast.engine.distributed import DistInfo, broadcast_object
from dsp_fast.pipelines.prepared import FORMAT_VERSION, MANIFEST, OPTIONS

PREPARED_SUBDIR = "prepared"
_SHOWN_REJECTS = 5  # rejected files named in the message (all are in rejects.txt)


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


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _read_manifest(folder: str) -> dict[str, Any] | None:
    return _read_json(os.path.join(folder, MANIFEST))


def rejects_error(folder: str, rejects: list[dict[str, str]], total: int) -> DatasetError:
    """The error for input files that could not be read: which, how many, where the list is, what to do."""
    shown = "; ".join(f"{r['path']} ({r['error']})" for r in rejects[:_SHOWN_REJECTS])
    more = f"; and {len(rejects) - _SHOWN_REJECTS} more" if len(rejects) > _SHOWN_REJECTS else ""
    return DatasetError(f"{len(rejects)} of {total} input images could not be read and would be skipped: {shown}"
                        f"{more}. The full list is {os.path.join(folder, 'rejects.txt')}. Replace or remove those "
                        "files and run again (the images already prepared are kept)")


def cache_dir(cfg: Config, root: str, size: tuple[int, int], fmt: str, long_tail: bool = False) -> str:
    """Where the trainer prepares `root` at `size`: under fast.prepared_dir, else `prepared/` beside the root. The
    name holds every setting that changes the bytes (and the format version), so another config or an older
    preparation gets its own folder; a source folder also names its long-tail set (size, crop, classes)."""
    base = cfg.fast.prepared_dir or os.path.join(os.path.dirname(os.path.abspath(root)), PREPARED_SUBDIR)
    name = f"{os.path.basename(os.path.abspath(root))}_{size[0]}x{size[1]}_{fmt}_v{FORMAT_VERSION}"
    if long_tail:
        (lw, lh), (cw, ch) = cfg.dsp.long_tail_size, cfg.data.crop_size
        name += f"_lt{lw}x{lh}_crop{cw}x{ch}_c{'-'.join(map(str, cfg.dsp.long_tail_classes))}"
    return os.path.join(base, name)


def _prepare_cached(dataset, out: str, options, say) -> None:
    """Prepare `dataset` into `out` unless a complete preparation with the same options is there; a folder
    prepared with other options (another root of the same name, say) is refused, naming both values."""
    from dsp_fast import prepare  # prepare pulls tqdm and process pools: only when there is work to do

    with _file_lock(os.path.join(out, ".lock")):
        manifest = _read_manifest(out)
        wanted = options.to_dict()
        old_options = manifest or _read_json(os.path.join(out, OPTIONS))
        if old_options is not None:
            diff = [(k, old_options.get(k), v) for k, v in wanted.items() if old_options.get(k) != v]
            if diff:
                text = ", ".join(f"{k}: {a!r} there, {b!r} wanted" for k, a, b in diff)
                raise DatasetError(f"{out} holds another preparation ({text}); delete it or set fast.prepared_dir")
        if manifest is not None and not manifest.get("rejects") and len(manifest.get("stems", [])) == len(dataset):
            return
        if manifest is not None and manifest.get("rejects"):  # replaced files are read again, the rest is kept
            say(f"{out}: retrying the {len(manifest['rejects'])} input images rejected last time")
        else:
            say(f"preparing {len(dataset)} images of {dataset.root} at {options.size[0]}x{options.size[1]} into "
                f"{out} (once; later runs re-use it)")
        summary = prepare.prepare_set(dataset, out, options, workers=min(8, os.cpu_count() or 1), progress=True)
        say(summary.report())
        if summary.rejects:
            raise rejects_error(out, summary.rejects, summary.total)


def prepare_from_roots(cfg: Config, say=print, source: bool = True, target: bool = True) -> tuple[str, str]:
    """(prepared source, prepared target train split) from the config's roots and sizes, prepared when needed."""
    from dsp_fast.prepare import RESAMPLE, Options

    d = cfg.data
    src_root, tgt_root = (os.path.abspath(r) for r in dataset_roots(cfg))
    fmt = cfg.fast.prepared_format
    if fmt == "auto":  # lossless for the synthetic shift: the fast trainer sees the reference trainer's pixels
        fmt = "png" if d.source == "synthetic" else "jpeg"
    src_out = cache_dir(cfg, src_root, d.source_size, fmt, long_tail=True)
    tgt_out = os.path.join(cache_dir(cfg, tgt_root, d.target_size, fmt), "train")
    if source:
        ds = SYNTHIA(src_root) if d.source == "synthia" else GTA5(src_root)
        # with its longtail/ set: the long-tail classes' images at dsp.long_tail_size, their valid windows counted
        opts = Options(ds.name, None, src_root, tuple(d.source_size), fmt, 95, ds.num_classes, True, RESAMPLE[ds.name],
                       long_tail_classes=tuple(cfg.dsp.long_tail_classes),
                       long_tail_size=tuple(cfg.dsp.long_tail_size), crop=tuple(d.crop_size))
        _prepare_cached(ds, src_out, opts, say)
    if target:
        # images only, so the class count does not matter: a 19- and a 16-class config share the preparation
        ds = Cityscapes(tgt_root, "train", num_classes=19, labels=False)
        opts = Options("cityscapes", "train", tgt_root, tuple(d.target_size), fmt, 95, 19, False,
                       RESAMPLE["cityscapes"])
        _prepare_cached(ds, tgt_out, opts, say)
    return src_out, tgt_out


def prepare_synthetic(cfg: Config) -> tuple[str, str]:
    """(prepared source, prepared target train split) of the synthetic shift, under <synthetic_root>/prepared/."""
    return prepare_from_roots(cfg, say=lambda msg: print(msg, flush=True))


def find_prepared(path: str, role: str, want_split: str | None) -> tuple[str, dict[str, Any]]:
    """The prepared folder `path` names (a Cityscapes parent folder given without its split: its `want_split`
    subfolder) and its manifest; a clear error naming the subfolder it wants otherwise."""
    manifest = _read_manifest(path)
    if manifest is None and want_split and (sub := _read_manifest(os.path.join(path, want_split))) is not None:
        return os.path.join(path, want_split), sub
    if manifest is None:
        if not os.path.isdir(path):
            raise DatasetError(f"{role} {path}: folder not found")
        subs = sorted(n for n in os.listdir(path) if _read_manifest(os.path.join(path, n)) is not None)
        wants = f"; the trainer wants the '{want_split}' split's folder ({os.path.join(path, want_split)})" \
            if want_split else ""
        found = f"; prepared subfolders here: {', '.join(subs)}" if subs else ""
        raise DatasetError(f"{role} {path}: not a prepared folder (no manifest.json){wants}{found}")
    return path, manifest


def check_prepared(cfg: Config, path: str, manifest: dict[str, Any], role: str, dataset: str,
                   size: tuple[int, int], size_field: str, split: str | None) -> None:
    """A prepared folder given on the command line must be what the config describes: dataset, size, split."""
    field = "data.source" if role.endswith("source") else "data.target"
    checks = [("dataset", manifest.get("dataset"), dataset, field),
              ("size", list(manifest.get("size", [])), list(size), size_field)]
    if split:
        checks.append(("split", manifest.get("split"), split, "the training split"))
    for key, got, want, field in checks:
        if got != want:
            raise DatasetError(f"{role} {path} was prepared with {key} {got!r}, but {field} is {want!r}; prepare it "
                               f"again with the config's value (or change the config)")
    if manifest.get("rejects"):
        raise rejects_error(path, manifest["rejects"], len(manifest["stems"]) + len(manifest["rejects"]))


def resolve_data(cfg: Config, say=print, check_eval: bool = True) -> tuple[str, str]:
    """Check every configured root (the eval split too, unless not `check_eval`), then the prepared (source,
    target train) folders: given (fast.prepared_source / prepared_target), or prepared now."""
    d, fast = cfg.data, cfg.fast
    check_data(cfg, source=not fast.prepared_source, target_train=not fast.prepared_target, eval_split=check_eval)
    src, tgt = "", ""
    if fast.prepared_source:
        src, m = find_prepared(fast.prepared_source, "--prepared-source", None)
        kind = "synthia" if d.source == "synthia" else "gta5"
        check_prepared(cfg, src, m, "--prepared-source", kind, d.source_size, "data.source_size", None)
    if fast.prepared_target:
        tgt, m = find_prepared(fast.prepared_target, "--prepared-target", "train")
        check_prepared(cfg, tgt, m, "--prepared-target", "cityscapes", d.target_size, "data.target_size", "train")
    if not (src and tgt):
        own_src, own_tgt = prepare_from_roots(cfg, say, source=not src, target=not tgt)
        src, tgt = src or own_src, tgt or own_tgt
    say(f"data: source {src}\n      target {tgt}")
    return src, tgt


def prepared_dirs(cfg: Config, info: DistInfo, check_eval: bool = True) -> tuple[str, str]:
    """The prepared (source, target) folders the loader reads, checked and (when needed) prepared on rank 0."""
    answer: tuple[str, object] | None = None
    if info.is_main:
        try:
            answer = ("ok", resolve_data(cfg, lambda msg: print(msg, flush=True), check_eval))
        except (DatasetError, OSError) as e:  # a full disk is the run's write error (exit 4), not the data's
            answer = ("write", str(failed)) if (failed := data_write_error(e)) else ("error", str(e))
    answer = broadcast_object(answer, info)
    if answer[0] != "ok":
        raise (RunWriteError if answer[0] == "write" else DatasetError)(str(answer[1]))
    return tuple(answer[1])  # type: ignore[return-value]


def resolve_backend(fast: FastConfig, info: DistInfo) -> str:
    """'auto': DALI where it can decode on the GPU and imports; the torch backend otherwise. An explicit 'dali'
    that does not import is a ConfigError (exit 2), not a traceback from deep inside the loader."""
    if fast.data_backend == "auto" and info.device.type != "cuda":
        return "torch"
    if fast.data_backend not in ("auto", "dali"):
        return fast.data_backend
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        if fast.data_backend == "auto":
            return "torch"
        raise ConfigError(f"config field 'fast.data_backend': 'dali' (--data-backend dali), but NVIDIA DALI "
                          f"does not import here ({e}); install nvidia-dali-cuda130 (or -cuda120), or use "
                          "--data-backend torch") from None
    return "dali"


def build_step_loader(cfg: Config, info: DistInfo, dirs: tuple[str, str], start_step: int, batch: int,
                      backend: str):
    """The per-step batches of this rank from `start_step` on (the loader is step-indexed: resuming is exact):
    `batch` images per domain (the trainer's per-rank share of data.batch_size, the global batch), read with
    `backend` (resolve_backend's answer)."""
    from dsp_fast.pipelines import build_loaders

    threads = cfg.fast.data_threads if cfg.fast.data_threads >= 0 else cfg.data.num_workers
    return build_loaders(dirs[0], dirs[1], crop_size=cfg.data.crop_size,
                         batch_size=batch, backend=backend, device=info.device, rank=info.rank,
                         world_size=info.world_size, seed=cfg.train.seed, num_threads=threads,
                         long_tail_classes=cfg.dsp.long_tail_classes,
                         num_long_tail=cfg.dsp.num_long_tail if cfg.dsp.enabled else 0, start_step=start_step,
                         template=cfg.dsp.enabled and cfg.dsp.template == "separate",
                         producer=cfg.fast.data_producer, cache_mib=cfg.fast.data_cache_mib)
