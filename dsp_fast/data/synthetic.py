"""The built-in synthetic domain shift: generated street scenes, GTA5-style source -> Cityscapes-style target.

Both domains draw their layouts from synthetic_scene.py and differ only in `Style`: a saturated, sunny game look
with noise texture, against a desaturated, darker, hue-shifted camera look with stripes, haze, blur and sensor
noise. The shift hurts a source-only model while the classes stay recognisable by shape, position and relative
brightness; DSP's colour jitter and blur cover part of it, self-training the rest. Written in the official layouts
(so the real readers read it):
  <root>/gta5/images/NNNNN.png, <root>/gta5/labels/NNNNN.png         (palette PNGs of Cityscapes label ids)
  <root>/cityscapes/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png
  <root>/cityscapes/gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png

    python -m dsp_fast.data.synthetic --out data/synthetic [--seed 0]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFilter

from dsp_fast.data.errors import DatasetError
from dsp_fast.data.synthetic_scene import BASE_COLOURS, BUILDING, ROAD, SIDEWALK, SKY, VEGETATION, Canvas, draw_scene


@dataclass(frozen=True)
class Style:
    """How one domain turns a scene into pixels (colours in sRGB 0..1)."""

    hue_shift_deg: float = 0.0  # rotation of every colour's hue about the grey axis
    class_hue_spread_deg: float = 0.0  # std of an extra hue rotation fixed per class: not one global palette map
    saturation: float = 1.0  # 1 keeps the colour, 0 gives grey
    brightness: float = 1.0  # multiplier of every colour
    contrast: float = 1.0  # about the image mean
    haze: float = 0.0  # blend towards `haze_colour` (a flat, overcast look)
    haze_colour: tuple[float, float, float] = (0.6, 0.6, 0.6)
    cast: tuple[float, float, float] = (0.0, 0.0, 0.0)  # global colour cast added to RGB
    gamma: float = 1.0  # output = input ** gamma (above 1 darkens the mid tones)
    texture: str = "noise"  # 'noise': per-pixel and blotchy noise; 'stripes': oriented sine stripes per class
    texture_strength: float = 0.05  # amplitude (0..1 scale) before the per-class factors
    sky_gradient: float = 0.25  # the sky brightens by this much from the top of the image to the horizon
    colour_jitter: float = 0.05  # std of the per-scene and per-instance colour variation of each class
    illumination_jitter: float = 0.12  # per-image brightness factor drawn from 1 +- this
    blur_sigma: float = 0.0  # Gaussian blur (pixels) of the rendered image, as from a softer lens
    sensor_noise: float = 0.0  # std of per-pixel Gaussian noise added after the blur (0..1 scale)


SOURCE_STYLE = Style()
TARGET_STYLE = Style(
    hue_shift_deg=35.0, class_hue_spread_deg=12.0, saturation=0.55, brightness=0.85, contrast=0.8, haze=0.12,
    haze_colour=(0.55, 0.6, 0.65), cast=(0.0, 0.02, 0.04), gamma=1.25, texture="stripes", texture_strength=0.06,
    sky_gradient=0.1, blur_sigma=0.8, sensor_noise=0.025,
)


@dataclass(frozen=True)
class SyntheticSpec:
    """What is generated; recorded in the completion marker so a different spec regenerates."""

    seed: int = 0
    source_count: int = 300
    target_train_count: int = 150
    target_val_count: int = 60
    source_size: tuple[int, int] = (256, 144)
    target_size: tuple[int, int] = (256, 128)
    source_style: Style = field(default_factory=lambda: SOURCE_STYLE)
    target_style: Style = field(default_factory=lambda: TARGET_STYLE)
    version: int = 1  # bumped when the generator changes what it draws, so old datasets are regenerated


MARKER = ".dsp_synthetic_complete.json"
TRAIN_CITIES = ("synthtown", "synthburg", "synthdorf")
VAL_CITIES = ("synthval",)
# Cityscapes colours of the label ids, for the GTA5-style palette PNGs (decoration: readers use the indices).
_LABEL_COLOURS = {0: (0, 0, 0), 7: (128, 64, 128), 8: (244, 35, 232), 11: (70, 70, 70), 21: (107, 142, 35),
                  23: (70, 130, 180), 24: (220, 20, 60), 25: (255, 0, 0), 26: (0, 0, 142), 28: (0, 60, 100),
                  31: (0, 80, 100), 32: (0, 0, 230), 33: (119, 11, 32)}
# Per-class texture: (amplitude factor, stripe angle in degrees, stripe period in pixels).
_TEXTURE = {ROAD: (1.0, 80.0, 5.0), SIDEWALK: (0.8, 0.0, 4.0), BUILDING: (0.7, 90.0, 6.0),
            VEGETATION: (1.6, 45.0, 3.0), SKY: (0.25, 0.0, 12.0)}
_DEFAULT_TEXTURE = (0.6, 30.0, 4.0)


def _rotate_hue(rgb_N3: np.ndarray, degrees_N: np.ndarray) -> np.ndarray:
    """Rotate colours about the grey axis (1,1,1) by per-colour angles (Rodrigues' formula)."""
    theta = np.deg2rad(degrees_N)[:, None]
    axis = np.full(3, 1 / np.sqrt(3))
    cross = np.cross(axis, rgb_N3)
    dot = (rgb_N3 @ axis)[:, None]
    return rgb_N3 * np.cos(theta) + cross * np.sin(theta) + axis * dot * (1 - np.cos(theta))


def _class_lut(values: dict[int, float], default: float) -> np.ndarray:
    lut = np.full(256, default, dtype=np.float32)
    for cls, v in values.items():
        lut[cls] = v
    return lut


@functools.lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return yy, xx


_TEX_AMP = _class_lut({c: t[0] for c, t in _TEXTURE.items()}, _DEFAULT_TEXTURE[0])
_TEX_ANGLE = np.deg2rad(_class_lut({c: t[1] for c, t in _TEXTURE.items()}, _DEFAULT_TEXTURE[1]))
_TEX_COS, _TEX_SIN = np.cos(_TEX_ANGLE), np.sin(_TEX_ANGLE)
_TEX_FREQ = (2 * np.pi / _class_lut({c: t[2] for c, t in _TEXTURE.items()}, _DEFAULT_TEXTURE[2])).astype(np.float32)


def render(cv: Canvas, style: Style, rng: np.random.Generator, class_hue: dict[int, float]) -> np.ndarray:
    """Pixels of a drawn scene in the given style, uint8 HxWx3."""
    classes = np.asarray(cv.classes)
    hue = style.hue_shift_deg + np.array([class_hue.get(int(c), 0.0) for c in classes])
    colours = _rotate_hue(np.stack(cv.colours), hue)
    luma = colours @ np.array([0.299, 0.587, 0.114])
    colours = (luma[:, None] + style.saturation * (colours - luma[:, None])) * style.brightness
    img = colours.astype(np.float32)[cv.inst]  # HxWx3

    h, w = cv.ids.shape
    yy, xx = _grid(h, w)
    shade = (cv.ids == SKY) * (style.sky_gradient / h) * yy  # the sky lightens towards the horizon
    if style.texture == "noise":
        coarse = rng.standard_normal((max(1, h // 8), max(1, w // 8)), dtype=np.float32)
        blotch = np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.Resampling.BILINEAR))
        pattern = 0.7 * rng.standard_normal((h, w), dtype=np.float32) + blotch
    elif style.texture == "stripes":
        ids = cv.ids
        pattern = 1.4 * np.sin(_TEX_FREQ[ids] * (xx * _TEX_COS[ids] + yy * _TEX_SIN[ids]))
    else:
        raise ValueError(f"unknown texture {style.texture!r} (expected 'noise' or 'stripes')")
    img += (shade + _TEX_AMP[cv.ids] * style.texture_strength * pattern)[:, :, None]

    gain = rng.uniform(1 - style.illumination_jitter, 1 + style.illumination_jitter)
    mean = img.reshape(-1, 3).mean(axis=0) * gain
    img = (img * gain - mean) * (style.contrast * (1 - style.haze))
    img += mean * (1 - style.haze) + style.haze * np.asarray(style.haze_colour, dtype=np.float32)
    img += np.asarray(style.cast, dtype=np.float32)
    # clip and gamma through a 10-bit lookup table: np.power on every pixel costs more than the rest together
    levels = np.clip(np.round(img * 1023), 0, 1023).astype(np.int16)
    out = np.round(255 * (np.arange(1024) / 1023) ** style.gamma).astype(np.uint8)[levels]
    if style.blur_sigma > 0:
        out = np.asarray(Image.fromarray(out).filter(ImageFilter.GaussianBlur(style.blur_sigma)))
    if style.sensor_noise > 0:
        noisy = out + rng.standard_normal(out.shape, dtype=np.float32) * (255 * style.sensor_noise)
        out = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    return out


def make_sample(spec: SyntheticSpec, domain: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 HxWx3, label uint8 HxW of Cityscapes label ids) of one scene; a pure function of its args."""
    code = {"source": 0, "target_train": 1, "target_val": 2}[domain]
    rng = np.random.default_rng([spec.seed, code, index])
    style = spec.source_style if domain == "source" else spec.target_style
    w, h = spec.source_size if domain == "source" else spec.target_size
    cv = draw_scene(w, h, rng, style.colour_jitter)
    # A fixed palette per domain and seed: the same class is always shifted by the same hue.
    hue_rng = np.random.default_rng([spec.seed, 100 + (code > 0)])
    class_hue = {c: float(hue_rng.normal(0.0, style.class_hue_spread_deg)) for c in sorted(BASE_COLOURS)}
    return render(cv, style, rng, class_hue), cv.ids


def _palette_png(label: np.ndarray) -> Image.Image:
    """A 'P' image whose indices are the label ids, like the real GTA5 labels."""
    im = Image.frombytes("P", (label.shape[1], label.shape[0]), np.ascontiguousarray(label, dtype=np.uint8).tobytes())
    palette = [0] * 768
    for cls, rgb in _LABEL_COLOURS.items():
        palette[3 * cls:3 * cls + 3] = rgb
    im.putpalette(palette)
    return im


def _sample_paths(out: str, spec: SyntheticSpec) -> list[tuple[str, int, str, str]]:
    """(domain, index, image path, label path) of every sample, in the official layouts."""
    jobs = [("source", i, os.path.join(out, "gta5", "images", f"{i + 1:05d}.png"),
             os.path.join(out, "gta5", "labels", f"{i + 1:05d}.png")) for i in range(spec.source_count)]
    for split, count, cities in (("train", spec.target_train_count, TRAIN_CITIES),
                                 ("val", spec.target_val_count, VAL_CITIES)):
        for i in range(count):
            city = cities[i % len(cities)]
            stem = f"{city}_{i // len(cities):06d}_000019"
            jobs.append((f"target_{split}", i,
                         os.path.join(out, "cityscapes", "leftImg8bit", split, city, f"{stem}_leftImg8bit.png"),
                         os.path.join(out, "cityscapes", "gtFine", split, city, f"{stem}_gtFine_labelIds.png")))
    return jobs


def _save(image: Image.Image, path: str, **kwargs) -> None:
    try:
        image.save(path, **kwargs)
    except OSError as e:
        if e.errno and not e.filename:  # a failed write (a full disk) names no file: name it
            raise OSError(e.errno, e.strerror, path) from e
        raise


def _write_samples(spec: SyntheticSpec, jobs: list[tuple[str, int, str, str]]) -> None:
    for domain, index, image_path, label_path in jobs:
        image, label = make_sample(spec, domain, index)
        # compress_level 1: noisy images barely compress better at higher levels, and saving is most of the time
        _save(Image.fromarray(image), image_path, compress_level=1)
        # the source labels are palette PNGs like GTA5's, the target ones 8-bit gray like Cityscapes' labelIds
        _save(_palette_png(label) if domain == "source" else Image.fromarray(label), label_path)


def _generate_into(out: str, spec: SyntheticSpec, workers: int) -> None:
    jobs = _sample_paths(out, spec)
    for folder in sorted({os.path.dirname(p) for job in jobs for p in job[2:]}):
        os.makedirs(folder, exist_ok=True)
    if workers <= 1 or len(jobs) < 64:
        _write_samples(spec, jobs)
        return
    chunks = [jobs[k::workers] for k in range(workers)]  # every sample is a pure function of (spec, domain, index)
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for done in [pool.submit(_write_samples, spec, chunk) for chunk in chunks]:
            done.result()


def _spec_json(spec: SyntheticSpec) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(spec)))  # tuples -> lists, as read back from the marker


def _is_complete(root: str, spec: SyntheticSpec) -> bool:
    try:
        with open(os.path.join(root, MARKER)) as f:
            return json.load(f) == _spec_json(spec)
    except (OSError, ValueError):
        return False


def ensure_synthetic(root: str, seed: int = 0, spec: SyntheticSpec | None = None,
                     workers: int | None = None) -> tuple[str, str]:
    """Generate the synthetic dataset under `root` unless a complete one with the same spec is there; returns
    (gta5_root, cityscapes_root). It is made in a temp folder beside `root`, renamed into place with its completion
    marker inside: an interrupted run never leaves a dataset that looks complete, and concurrent callers (ranks) end
    with one copy. A different seed or spec replaces a dataset this function wrote; a non-empty `root` it did not
    write is never touched. spec: counts, sizes and styles (`seed` replaces its seed); workers: processes drawing
    the images (default: up to 4 CPUs; the result does not depend on it)."""
    spec = dataclasses.replace(spec or SyntheticSpec(), seed=seed)
    root = os.path.abspath(root)
    paths = (os.path.join(root, "gta5"), os.path.join(root, "cityscapes"))
    if _is_complete(root, spec):
        return paths
    foreign = os.path.isdir(root) and os.listdir(root) and not os.path.exists(os.path.join(root, MARKER))
    if foreign or (os.path.exists(root) and not os.path.isdir(root)):
        raise DatasetError(f"{root}: exists and is not a synthetic dataset written by dsp_fast; remove it or choose "
                           "another data.synthetic_root")
    # said aloud: a command run from another folder than usual (evaluate with a checkpoint's relative
    # data.synthetic_root) would otherwise write tens of MB into the current folder without a word
    print(f"generating the built-in synthetic domain-shift dataset into {root} (data.synthetic_root; "
          f"{spec.source_count} source, {spec.target_train_count} + {spec.target_val_count} target images; once, "
          "later runs re-use it)", flush=True)
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700); the dataset should read like any folder
    try:
        _generate_into(tmp, spec, min(4, os.cpu_count() or 1) if workers is None else workers)
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump(_spec_json(spec), f, indent=1)
        if _is_complete(root, spec):  # a concurrent caller finished first: keep its copy, files may be open
            return paths
        if os.path.isdir(root):  # empty, or ours with another spec: move it aside, then swap in the new one
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.old-", dir=parent)
            os.replace(root, os.path.join(old, "data"))
            os.replace(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, root)
            except OSError:
                if not _is_complete(root, spec):  # not a concurrent caller finishing first: a real error
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the built-in synthetic domain-shift dataset.")
    parser.add_argument("--out", required=True, help="folder to write (gta5/ and cityscapes/ inside)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (same seed, same images)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    gta5, cityscapes = ensure_synthetic(args.out, args.seed)
    spec = SyntheticSpec(seed=args.seed)
    print(f"synthetic dataset ready in {time.perf_counter() - start:.1f} s: {gta5} ({spec.source_count} images), "
          f"{cityscapes} ({spec.target_train_count} train, {spec.target_val_count} val)")


if __name__ == "__main__":
    main()
