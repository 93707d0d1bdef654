"""One-time conversion of GTA5, SYNTHIA or Cityscapes to the training format the fast loaders read.

    python -m dsp_fast.prepare --dataset gta5 --root /data/GTA5 --out /data/prepared/gta5
    python -m dsp_fast.prepare --dataset cityscapes --root /data/cityscapes --out /data/prepared/cityscapes

Why: DALI decodes the original PNGs (1914x1052 GTA5, 2048x1024 Cityscapes) only on CPU threads (about 30 ms each),
and GTA5's palette labels lose their ids in DALI. Each image is resized once to the dataset's base size as the
reference trainer does, written as a baseline JPEG (nvJPEG decodes it on the GPU) or a lossless PNG, its label as an
8-bit train-id PNG; a source set also gets `longtail/` (docs/data.md, "Preparation"; the layout and the manifest:
`dsp_fast.pipelines.prepared`).

Resumable: every file is written to a temp name and renamed, and a per-image sidecar written last marks the image
done. A file that cannot be read is listed with its error in rejects.txt and the manifest, and makes the exit code 1;
a write that fails (a full disk) stops it with exit code 4, naming the file.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import glob
import io
import json
import os
import sys
import time
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from dsp_fast.atomic_io import TMP_INFIX, atomic_write
from dsp_fast.data import GTA5, SOURCE_RESAMPLE, SYNTHIA, Cityscapes, DatasetError, resize_image, resize_label
from dsp_fast.data.windows import valid_window_box
from dsp_fast.pipelines import prepared

# (width, height) each dataset is resized to before cropping, and the PIL filter, as the authors' script and loaders
BASE_SIZES = {"gta5": (1280, 720), "synthia": (1280, 760), "cityscapes": (1024, 512)}
RESAMPLE = {"gta5": SOURCE_RESAMPLE, "synthia": SOURCE_RESAMPLE, "cityscapes": "bilinear"}
LONG_TAIL_SIZE = (1920, 1080)  # (width, height) of a source image before a long-tail crop (the authors' rand_mixer)
# The authors' long-tail classes (train ids): GTA5 rider, bus, train, motorcycle, bicycle; SYNTHIA wall, fence,
# traffic light, bus.
LONG_TAIL_CLASSES = {"gta5": (12, 15, 16, 17, 18), "synthia": (3, 4, 6, 13)}


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything that decides the bytes written; a resumed run must use the same (checked)."""

    dataset: str
    split: str | None
    source_root: str
    size: tuple[int, int]
    format: str
    quality: int
    num_classes: int
    labels: bool
    resample: str = "bilinear"
    long_tail_classes: tuple[int, ...] = ()
    long_tail_size: tuple[int, int] | None = None  # a source set: make longtail/ at this size (None: none)
    crop: tuple[int, int] = (512, 512)  # the training crop the long-tail windows are counted for
    is_long_tail: bool = False  # this set is a longtail/ subset: count the windows of long_tail_classes

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def long_tail_options(self) -> Options:
        assert self.long_tail_size is not None
        return dataclasses.replace(self, size=self.long_tail_size, long_tail_size=None, is_long_tail=True)


@dataclasses.dataclass
class Summary:
    """What one run did; `rejects` are dicts with the stem, the file's path and the error."""

    out: str
    total: int
    converted: int
    skipped: int
    rejects: list[dict[str, str]]
    bytes: int
    seconds: float
    long_tail: Summary | None = None  # the longtail/ subset of a source set
    resized_pairs: int = 0
    unknown_ids: dict[int, int] = dataclasses.field(default_factory=dict)  # label ids no such label holds -> pixels
    unknown_files: list[str] = dataclasses.field(default_factory=list)  # the label files holding them

    def report(self) -> str:
        lines = [f"{self.out}: {self.total - len(self.rejects)} images ready ({self.converted} converted now, "
                 f"{self.skipped} already done), {len(self.rejects)} rejected; {_human(self.bytes)} on disk; "
                 f"{self.seconds:.1f} s"]
        if self.unknown_ids:
            ids = ", ".join(f"{k} ({v} px)" for k, v in sorted(self.unknown_ids.items()))
            lines.append(f"  warning: {len(self.unknown_files)} label files hold ids outside the dataset's label "
                         f"table, trained as ignore (255): ids {ids}; e.g. {self.unknown_files[0]}")
        if self.resized_pairs:
            lines.append(f"  {self.resized_pairs} image/label pairs of different sizes, both resized to the base size "
                         "(image bicubic, label nearest)")
        lines += [f"  REJECTED {r['path']}: {r['error']}" for r in self.rejects]
        if self.rejects:
            lines.append(f"  {len(self.rejects)} of {self.total} images rejected, listed in "
                         f"{os.path.join(self.out, prepared.REJECTS)}")
        if self.long_tail is not None:
            lines.append(self.long_tail.report())
        return "\n".join(lines)


def _human(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def open_dataset(name: str, root: str, split: str | None, num_classes: int, labels: bool):
    if name == "gta5":
        return GTA5(root)
    if name == "synthia":
        return SYNTHIA(root)
    return Cityscapes(root, split or "train", num_classes=num_classes, labels=labels)


def stems_of(image_paths: list[str]) -> list[str]:
    """Output names: the file name without extension (and Cityscapes' `_leftImg8bit`); the relative path if clashing."""
    names = [os.path.splitext(os.path.basename(p))[0].removesuffix("_leftImg8bit") for p in image_paths]
    if len(set(names)) == len(names):
        return names
    base = os.path.commonpath(image_paths)
    return [os.path.splitext(os.path.relpath(p, base))[0].replace(os.sep, "__") for p in image_paths]


def encode_image(image_HWC: np.ndarray, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        # Baseline (not progressive) 4:4:4: nvJPEG decodes it on the GPU, and full-resolution chroma keeps the
        # colour edges of thin long-tail objects (poles, bicycles) that get pasted.
        Image.fromarray(image_HWC).save(buf, format="JPEG", quality=quality, subsampling=0, progressive=False)
    else:
        Image.fromarray(image_HWC).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_label(label_HW: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(label_HW.astype(np.uint8), mode="L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- one image
_STATE: dict[str, Any] = {}  # per worker process: the dataset, the output folder, the options and the stems


def _init(dataset, out: str, options: Options, stems: list[str]) -> None:
    _STATE.update(dataset=dataset, out=out, options=options, stems=stems)


def _reject(ds, i: int, stem: str, err: Exception) -> dict[str, str]:
    """The record of a rejected image; the path is the file the error names (the image if it names none)."""
    paths = [ds.image_paths[i]] + ([ds.label_paths[i]] if ds.label_paths else [])
    path = next((p for p in reversed(paths) if p in str(err)), paths[0])
    return {"stem": stem, "path": path, "error": str(err)}


def convert_one(i: int) -> tuple[str, dict[str, Any]]:
    """Convert image i: ('ok', sidecar) or ('reject', record). Only unreadable input files become rejects."""
    ds, out, opt, stem = _STATE["dataset"], _STATE["out"], _STATE["options"], _STATE["stems"][i]
    unknown: dict[int, int] = {}
    try:
        # the reader's checks, including a pair of different sizes where the reader refuses it
        image, label = ds.read_pair(i, unknown)
    except (DatasetError, OSError) as e:
        return "reject", _reject(ds, i, stem, e)
    h, w = image.shape[:2]
    mismatch = label is not None and (h, w) != label.shape
    side: dict[str, Any] = {"stem": stem, "source_size": [w, h], "resized_pair": mismatch,
                            "unknown_ids": {str(k): v for k, v in sorted(unknown.items())}}
    if label is not None and opt.long_tail_size is not None:
        # which long-tail classes this image holds at the long-tail size (nearest upsampling keeps every class)
        lt_label = resize_label(label, opt.long_tail_size)
        side["long_tail"] = [c for c in opt.long_tail_classes if (lt_label == c).any()]
    if mismatch:  # a GTA5 pair of different sizes, aligned as the authors do (`GTA5.resizes_mismatched_pairs`)
        image = np.asarray(Image.fromarray(image).resize(tuple(opt.size), Image.Resampling.BICUBIC))
    else:
        image = resize_image(image, opt.size, opt.resample)
    data = encode_image(image, opt.format, opt.quality)
    atomic_write(prepared.image_path(out, stem, opt.format), data, durable=False)
    nbytes = len(data)
    if label is not None:
        label = resize_label(label, opt.size).astype(np.uint8)
        data = encode_label(label)
        atomic_write(prepared.label_path(out, stem), data, durable=False)
        nbytes += len(data)
    counts = [] if label is None else np.bincount(label.ravel(), minlength=256)[:opt.num_classes].astype(int).tolist()
    side.update(bytes=nbytes, counts=counts)  # per-class pixel counts
    if label is not None and opt.is_long_tail:
        maps = {int(c): valid_window_box(label, int(c), opt.crop) for c in opt.long_tail_classes}
        maps = {c: m for c, m in maps.items() if m[0].any()}
        atomic_write(prepared.windows_path(out, stem), prepared.encode_window_maps(maps), durable=False)
        side["windows"] = {c: int(m[0].sum()) for c, m in maps.items()}
    atomic_write(prepared.stats_path(out, stem), json.dumps(side).encode(), durable=False)
    return "ok", side


# ---------------------------------------------------------------------------------------------- one folder
def _check_options(out: str, options: Options) -> None:
    """A resumed run must write the same bytes as the first; otherwise the folder would mix two preparations."""
    path = os.path.join(out, prepared.OPTIONS)
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        diff = {k: (old.get(k), v) for k, v in options.to_dict().items() if old.get(k) != v}
        if diff:
            changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise SystemExit(f"{out} was prepared with other options ({changes}); use a new --out or delete it")
    atomic_write(path, json.dumps(options.to_dict()).encode())


def _is_done(out: str, stem: str, options: Options) -> bool:
    paths = [prepared.stats_path(out, stem), prepared.image_path(out, stem, options.format)]
    paths += [prepared.label_path(out, stem)] if options.labels else []
    return all(os.path.isfile(p) for p in paths)


def _results(todo: list[int], workers: int, init_args: tuple):
    """(status, payload) per image in `todo`, from `workers` processes (inline below 2: easy to debug)."""
    if workers < 2:
        _init(*init_args)
        for i in todo:
            yield convert_one(i)
        return
    pool = concurrent.futures.ProcessPoolExecutor(workers, initializer=_init, initargs=init_args)
    try:
        yield from pool.map(convert_one, todo, chunksize=4)
    except BaseException:  # Ctrl-C: drop the queued images instead of converting them all before exiting
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def prepare_set(dataset, out: str, options: Options, workers: int = 0, progress: bool = True) -> Summary:
    """Convert one dataset (or one Cityscapes split) into `out`, resuming a previous run there."""
    start = time.perf_counter()
    for sub in ("images", "labels", "stats", *(("windows",) if options.is_long_tail else ())):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
        for tmp in glob.glob(os.path.join(out, sub, f"*{TMP_INFIX}*")):  # left by an interrupted run
            os.remove(tmp)
    _check_options(out, options)
    stems = getattr(dataset, "stems", None) or stems_of(dataset.image_paths)
    todo = [i for i, s in enumerate(stems) if not _is_done(out, s, options)]
    rejects: list[dict[str, str]] = []
    bar = tqdm(total=len(stems), initial=len(stems) - len(todo), desc=f"prepare {os.path.basename(out)}",
               unit="img", disable=not progress, file=sys.stderr)
    with bar:
        for status, payload in _results(todo, workers, (dataset, out, options, stems)):
            if status == "reject":
                rejects.append(payload)
                bar.write(f"rejected {payload['path']}: {payload['error']}", file=sys.stderr)
            bar.update(1)
    rejected = {r["stem"] for r in rejects}
    done = [s for s in stems if s not in rejected]
    long_tail = None
    if options.long_tail_size is not None and options.labels:
        # a second pass over the images that hold a long-tail class: resized to the long-tail size, windows counted
        holders = [i for i, s in enumerate(stems) if s not in rejected and _sidecar(out, s).get("long_tail")]
        lt_out = os.path.join(out, prepared.LONG_TAIL_DIR)
        long_tail = prepare_set(Subset(dataset, holders, [stems[i] for i in holders]), lt_out,
                                options.long_tail_options(), workers, progress)
    prepared.build_manifest(out, options.to_dict(), done, rejects,
                            long_tail=prepared.LONG_TAIL_DIR if long_tail is not None else None)
    nbytes = resized = 0
    unknown: dict[int, int] = {}
    unknown_files: list[str] = []
    for i, s in enumerate(stems):
        if s in rejected:
            continue
        side = _sidecar(out, s)
        nbytes += side["bytes"]
        resized += bool(side.get("resized_pair"))
        if side.get("unknown_ids") and not options.is_long_tail:  # the long-tail pass reads the same labels again
            unknown_files.append(dataset.label_paths[i])
            for k, v in side["unknown_ids"].items():
                unknown[int(k)] = unknown.get(int(k), 0) + v
    return Summary(out, len(stems), len(todo) - len(rejects), len(stems) - len(todo), rejects, nbytes,
                   time.perf_counter() - start, long_tail, resized, unknown, unknown_files)


def _sidecar(out: str, stem: str) -> dict[str, Any]:
    with open(prepared.stats_path(out, stem)) as f:
        return json.load(f)


class Subset:
    """Some images of a dataset, under the stems the full set gave them (the long-tail pass)."""

    def __init__(self, dataset, indices: list[int], stems: list[str]) -> None:
        self.dataset, self.indices, self.stems = dataset, indices, stems
        self.image_paths = [dataset.image_paths[i] for i in indices]
        self.label_paths = [dataset.label_paths[i] for i in indices]

    def __getitem__(self, j: int):
        return self.dataset[self.indices[j]]

    def read_pair(self, j: int, unknown: dict[int, int] | None = None):
        return self.dataset.read_pair(self.indices[j], unknown)


# ---------------------------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dsp_fast.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, choices=sorted(BASE_SIZES))
    p.add_argument("--root", required=True, help="the dataset in its official layout")
    p.add_argument("--out", required=True, help="output folder (Cityscapes: one subfolder per split)")
    p.add_argument("--format", choices=("jpeg", "png"), default="jpeg",
                   help="jpeg: decoded on the GPU by DALI (default); png: lossless, decoded on CPU threads")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality 1..100 (default 95)")
    p.add_argument("--split", nargs="+", default=None, help="Cityscapes splits (default: train val)")
    p.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), help="override the dataset's base size")
    p.add_argument("--num-classes", type=int, default=None, help="Cityscapes: 19 (default) or 16 (SYNTHIA model)")
    p.add_argument("--no-labels", action="store_true", help="Cityscapes: images only (no gtFine)")
    p.add_argument("--long-tail-size", type=int, nargs=2, metavar=("W", "H"), default=list(LONG_TAIL_SIZE),
                   help="GTA5 / SYNTHIA: size of the longtail/ images (default 1920 1080; dsp.long_tail_size)")
    p.add_argument("--long-tail-classes", type=int, nargs="+", default=None,
                   help="GTA5 / SYNTHIA: train ids of the long-tail classes (default: the authors'; "
                        "dsp.long_tail_classes)")
    p.add_argument("--crop", type=int, nargs=2, metavar=("W", "H"), default=[512, 512],
                   help="training crop the long-tail windows are counted for (default 512 512; data.crop_size)")
    p.add_argument("--no-long-tail", action="store_true", help="GTA5 / SYNTHIA: no longtail/ subset")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.dataset != "cityscapes" and (args.split or args.num_classes or args.no_labels):
        p.error("--split, --num-classes and --no-labels apply to --dataset cityscapes only")
    if not 1 <= args.quality <= 100:
        p.error(f"--quality must be in 1..100, got {args.quality}")
    if args.size and min(args.size) < 1:
        p.error(f"--size must be positive, got {args.size}")
    (lw, lh), (cw, ch) = args.long_tail_size, args.crop
    if min(cw, ch) < 1 or lw < cw or lh < ch:
        p.error(f"--crop {cw} {ch} must be positive and fit in --long-tail-size {lw} {lh}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    splits = (args.split or ["train", "val"]) if args.dataset == "cityscapes" else [None]
    default_classes = {"gta5": 19, "synthia": 16, "cityscapes": 19}[args.dataset]
    rejected = 0
    for split in splits:
        labels = not args.no_labels
        try:
            ds = open_dataset(args.dataset, args.root, split, args.num_classes or default_classes, labels)
        except DatasetError as e:
            hint = " (images only: --no-labels)" if args.dataset == "cityscapes" and labels else ""
            print(f"error: {e}{hint}", file=sys.stderr)
            return 2
        source = args.dataset in LONG_TAIL_CLASSES and not args.no_long_tail
        options = Options(args.dataset, split, os.path.abspath(args.root), tuple(args.size or BASE_SIZES[args.dataset]),
                          args.format, args.quality, ds.num_classes, labels, RESAMPLE[args.dataset],
                          tuple(args.long_tail_classes or LONG_TAIL_CLASSES.get(args.dataset, ())),
                          tuple(args.long_tail_size) if source else None, tuple(args.crop))
        out = os.path.join(args.out, split) if split else args.out
        try:
            summary = prepare_set(ds, out, options, args.workers, progress=not args.no_progress)
        except OSError as e:
            # a full disk: one line naming the file and the free space, exit 4 as the trainers (imported here:
            # checkpoint_file brings torch, which a preparation does not need otherwise)
            from dsp_fast.checkpoint_file import EXIT_WRITE_FAILED, data_write_error

            if (failed := data_write_error(e)) is None:
                raise
            print(f"error: {failed}; the images done so far are kept (run again to continue)", file=sys.stderr)
            return EXIT_WRITE_FAILED
        print(summary.report())
        rejected += len(summary.rejects)
    if rejected:
        print(f"{rejected} input files rejected (listed above and in rejects.txt); the rest is ready", file=sys.stderr)
    return 1 if rejected else 0


if __name__ == "__main__":
    sys.exit(main())
