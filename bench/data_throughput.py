"""Data throughput: the reference's PIL DataLoader over the original PNGs vs the prepared data (torch and DALI).

    python -m bench.data_throughput [--quick] [--threads 1 2] [--device cpu|cuda] [--rounds N] [--out DIR]

Generates GTA5-like (1914x1052 PNG, palette labels) and Cityscapes-like (2048x1024 PNG) scenes in a temp folder
(nothing is downloaded), prepares them with `dsp_fast.prepare` (JPEG q95), then times, with the same thread count:
- per stream (batches of 2 crops of 512x512; source = image + label, target = image only, longtail = the 4
  long-tail crops of a step from the 1920x1080 longtail/ set, image + label): `reference-png` the reference's
  RandomCrops DataLoader (PIL decode of the PNG, resize, crop); `torch-jpeg` the `torch` backend (PIL decode + crop
  in DataLoader workers); `dali-jpeg-roi` the `dali` backend (CPU operators on a CPU device, GPU decode with
  --device cuda) decoding only each crop's window (`fn.decoders.image_slice`, what the loaders run) and
  `dali-jpeg-full` decoding each whole file then slicing it (the path before the region decode);
- per training step (3 x 2 crops + 4 long-tail crops): the reference's three loaders plus its long-tail crops
  (decoded on the main thread) vs `build_loaders` with each backend.
images/s counts 512x512 crops delivered; threads = DataLoader workers or DALI threads per stream. Every row is
measured --rounds times, the variants alternating within each round, and its median reported under "medians".
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from bench.provenance import RESULTS_DIR, parse_args, result_env, stamped, tool_parser, version, write_result
from dsp_fast import prepare
from dsp_fast.data import GTA5, SOURCE_RESAMPLE, Cityscapes, load_or_build_class_index
from dsp_fast.pipelines import build_loaders
from dsp_fast.pipelines.plan import CropPlan, ShardedSampler, random_window
from dsp_fast.pipelines.prepared import LONG_TAIL_DIR, load_prepared
from dsp_fast.reference import LongTailSource, RandomCrops

GTA5_SIZE, CITYSCAPES_SIZE = (1914, 1052), (2048, 1024)
SOURCE_BASE, TARGET_BASE, CROP, LONG_TAIL_SIZE = (1280, 720), (1024, 512), (512, 512), (1920, 1080)
LONG_TAIL, BATCH = (12, 15, 16, 17, 18), 2
_IDS = (7, 8, 11, 21, 23, 24, 26, 25, 28, 32, 33)  # Cityscapes ids: road ... car, rider, bus, motorcycle, bicycle


# ----------------------------------------------------------------------------------------------- synthetic data
def scene(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB image, label ids): sky / building / road bands, objects as rectangles, shading and sensor noise,
    so that PNG compresses about as a rendered frame does (neither flat nor pure noise)."""
    ids = np.full((h, w), 23, np.uint8)
    ids[h // 3:] = 11
    ids[3 * h // 5:] = 7
    ids[3 * h // 5:, : w // 6] = 8
    for _ in range(12):
        rw, rh = int(rng.integers(w // 40, w // 6)), int(rng.integers(h // 30, h // 5))
        x, y = int(rng.integers(0, w - rw)), int(rng.integers(h // 3, h - rh))
        ids[y:y + rh, x:x + rw] = rng.choice(_IDS[5:])
    colours = rng.integers(30, 225, (256, 3)).astype(np.float32)
    shade = np.linspace(0.8, 1.2, w, dtype=np.float32)[None, :, None]
    img = colours[ids] * shade + rng.normal(0, 6, (h, w, 3)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), ids


def make_data(root: str, n_source: int, n_target: int, seed: int = 0) -> tuple[str, str]:
    rng = np.random.default_rng(seed)
    gta, cs = os.path.join(root, "gta5"), os.path.join(root, "cityscapes")
    for sub in ("images", "labels"):
        os.makedirs(os.path.join(gta, sub), exist_ok=True)
    for i in range(n_source):
        img, ids = scene(rng, *GTA5_SIZE)
        Image.fromarray(img).save(os.path.join(gta, "images", f"{i:05d}.png"))
        pal = Image.fromarray(ids, mode="P")
        pal.putpalette(rng.integers(0, 256, 768).tolist())
        pal.save(os.path.join(gta, "labels", f"{i:05d}.png"))
    city = os.path.join(cs, "leftImg8bit", "train", "benchcity")
    os.makedirs(city, exist_ok=True)
    for i in range(n_target):
        img, _ = scene(rng, *CITYSCAPES_SIZE)
        Image.fromarray(img).save(os.path.join(city, f"benchcity_{i:06d}_000019_leftImg8bit.png"))
    return gta, cs


def make_prepared(root: str, n_source: int, n_target: int, workers: int) -> tuple[str, str, str, str]:
    """(GTA5-like root, Cityscapes-like root, prepared source, prepared target train), made under `root`."""
    gta, cs = make_data(root, n_source, n_target)
    src, tgt = os.path.join(root, "prep_gta5"), os.path.join(root, "prep_cs")
    prepare.main(["--dataset", "gta5", "--root", gta, "--out", src, "--no-progress", "--workers", str(workers)])
    prepare.main(["--dataset", "cityscapes", "--root", cs, "--out", tgt, "--split", "train", "--no-labels",
                  "--no-progress", "--workers", str(workers)])
    return gta, cs, src, os.path.join(tgt, "train")


# ----------------------------------------------------------------------------------------------- timing
def timed(it: Iterator, warmup: int, batches: int, per_batch: int) -> dict[str, float]:
    """Images/s over `batches` after `warmup` (worker start-up and pipeline build are not counted)."""
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"images_per_s": round(batches * per_batch / seconds, 2), "ms_per_batch": round(1e3 * seconds / batches, 2)}


def reference_stream(dataset, base: tuple[int, int], batch: int, threads: int, resample: str = "bilinear"
                     ) -> Iterator:
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10**9)  # no epoch restarts
    loader = torch.utils.data.DataLoader(RandomCrops(dataset, base, CROP, resample), batch_size=batch, sampler=sampler,
                                         num_workers=threads, persistent_workers=threads > 0, drop_last=True)
    return iter(loader)


def prepared_stream(backend: str, root: str, labels: bool, batch: int, threads: int, device: torch.device,
                    roi: bool = True):
    ds = load_prepared(root)
    sampler = ShardedSampler(len(ds), seed=1)

    def plan(step: int) -> CropPlan:
        rng = np.random.default_rng([1, step])
        return CropPlan(sampler.take(step * batch, batch), [random_window(rng, ds.size, CROP) for _ in range(batch)],
                        [False] * batch, [])

    if backend == "dali":
        from dsp_fast.pipelines.dali_backend import DaliCropStream

        return DaliCropStream(ds, plan, CROP, labels, device, max(1, threads), roi=roi)
    from dsp_fast.pipelines.torch_backend import TorchCropStream

    return TorchCropStream(ds, plan, CROP, labels, device, threads, gpu_decode=backend == "torchvision")


def reference_steps(gta: str, cs: str, batch: int, threads: int) -> Iterator:
    """The reference trainer's data per step: three loaders, then the long-tail crops on the main thread."""
    source, target = GTA5(gta), Cityscapes(cs, "train", labels=False)
    index = load_or_build_class_index(source, 19)
    streams = [reference_stream(source, SOURCE_BASE, batch, threads, SOURCE_RESAMPLE),
               reference_stream(source, SOURCE_BASE, batch, threads, SOURCE_RESAMPLE),
               reference_stream(target, TARGET_BASE, batch, threads)]
    gen = torch.Generator().manual_seed(0)
    long_tail = LongTailSource(source, index, LONG_TAIL_SIZE, CROP)
    candidates = [c for c in LONG_TAIL if index[c]]
    while True:
        out = [next(s) for s in streams]
        for p in torch.randperm(len(candidates), generator=gen)[:2].tolist():
            for _ in range(batch):  # each template image its own crop
                out.append(long_tail.draw(candidates[p], "counts", gen))
        yield out


# ----------------------------------------------------------------------------------------------- the run
def backends(device: torch.device) -> list[tuple[str, str, bool]]:
    """(row name, backend, DALI region decode) of each prepared-data variant; the DALI ones adjacent, so a round
    measures them back to back."""
    names = [("torch-jpeg", "torch", True)]
    if version("nvidia.dali"):
        names += [("dali-jpeg-full", "dali", False), ("dali-jpeg-roi", "dali", True)]
    else:
        print("DALI not installed: skipping the dali rows", file=sys.stderr)
    if device.type == "cuda" and version("torchvision"):
        names.append(("torchvision-jpeg", "torchvision", True))
    return names


def run(args: argparse.Namespace, work: str) -> dict:
    device, b = torch.device(args.device), BATCH
    (n_src, n_tgt, w, n) = (4, 2, 1, 3) if args.quick else (24, 12, 3, 20)
    t0 = time.perf_counter()
    gta, cs, src_dir, tgt_dir = make_prepared(work, n_src, n_tgt, os.cpu_count() or 1)
    info: dict = {"generate_and_prepare_s": round(time.perf_counter() - t0, 1), "bytes_per_image": {
        "gta5_png": os.path.getsize(os.path.join(gta, "images", "00000.png")),
        "gta5_prepared_jpeg": os.path.getsize(os.path.join(src_dir, "images", "00000.jpg")),
        "cityscapes_png": os.path.getsize(os.path.join(cs, "leftImg8bit", "train", "benchcity",
                                                       "benchcity_000000_000019_leftImg8bit.png")),
        "cityscapes_prepared_jpeg": os.path.getsize(os.path.join(tgt_dir, "images", "benchcity_000000_000019.jpg"))}}
    lt_dir, rows = os.path.join(src_dir, LONG_TAIL_DIR), []

    def row(kind: str, stream: str, backend: str, threads: int, make: Callable[[], Iterator], per: int) -> None:
        it = make()
        r = {"round": rnd, "kind": kind, "stream": stream, "backend": backend, "threads": threads, "batch": per,
             "device": str(device), **timed(it, w, n, per)}
        if hasattr(it, "close"):
            it.close()
        rows.append(r)
        print(f"{kind:6s} {stream:8s} {backend:15s} threads={threads}  {r['images_per_s']:8.2f} img/s  "
              f"{r['ms_per_batch']:8.1f} ms/batch", flush=True)

    variants = backends(device)
    for rnd in range(args.rounds):
        for t in [1] if args.quick else args.threads:
            row("stream", "source", "reference-png", t, lambda: reference_stream(GTA5(gta), SOURCE_BASE, b, t), b)
            row("stream", "target", "reference-png", t,
                lambda: reference_stream(Cityscapes(cs, "train", labels=False), TARGET_BASE, b, t), b)
            for stream, root, labels, per in (("source", src_dir, True, b), ("target", tgt_dir, False, b),
                                              ("longtail", lt_dir, True, 2 * b)):
                for name, be, roi in variants:
                    row("stream", stream, name, t, lambda: prepared_stream(be, root, labels, per, t, device, roi), per)
            row("step", "all", "reference-png", t, lambda: reference_steps(gta, cs, b, t), 5 * b)
            for name, be, roi in variants:
                row("step", "all", name, t, lambda: build_loaders(
                    src_dir, tgt_dir, batch_size=b, backend=be, device=device, num_threads=t,
                    long_tail_classes=LONG_TAIL, num_long_tail=2, dali_roi=roi), 5 * b)
    return {"info": info, "rows": rows, "medians": medians(rows)}


def medians(rows: list[dict]) -> list[dict]:
    """One row per (kind, stream, backend, threads): the median over the rounds, and how many rounds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kind"], r["stream"], r["backend"], r["threads"]), []).append(r)
    out = []
    for (kind, stream, backend, threads), rs in groups.items():
        ms = float(np.median([r["ms_per_batch"] for r in rs]))
        out.append({"kind": kind, "stream": stream, "backend": backend, "threads": threads, "rounds": len(rs),
                    "ms_per_batch": round(ms, 2), "images_per_s": round(1e3 * rs[0]["batch"] / ms, 2)})
        print(f"median {kind:6s} {stream:8s} {backend:15s} threads={threads}  {out[-1]['images_per_s']:8.2f} img/s  "
              f"{ms:8.1f} ms/batch  ({len(rs)} rounds)", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = tool_parser("bench.data_throughput", __doc__)
    p.add_argument("--quick", action="store_true", help="smoke run: few images and batches, one thread")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=1, help="measure every row this many times, alternating")
    p.add_argument("--out", default=RESULTS_DIR)
    args = parse_args(p, argv)
    with tempfile.TemporaryDirectory(prefix="dsp_data_bench_") as work:
        env = result_env(args.device, args.command, dali=version("nvidia.dali"), pillow=version("PIL"),
                         numpy=np.__version__)
        result = {"env": env, **run(args, work)}
    path = stamped(args.out, "data_throughput", "quick" if args.quick else "") + ".json"
    write_result(path, result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
