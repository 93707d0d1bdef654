"""The reference's strong augmentation (DSP step 4): kornia 0.2.0's ColorJitter and GaussianBlur2d written out image
by image, as the authors' script ran them on 0..1 RGB images.

This is the reference's own code, on purpose a second implementation: the fast path's `dsp_fast/augment.py` is
tested against it (and against values worked out by hand), so the two must never share a line.

- one jitter coin (p = 0.8) and one blur coin (p = 0.5) per step, shared by every mixed image of the step;
- colour jitter per image, the four adjustments in that image's own random order: brightness adds b ~ U(-s, s)
  and clamps to [0, 1]; contrast multiplies by c ~ U(1-s, 1+s) and clamps (no blend to the mean); saturation
  multiplies HSV S by U(1-s, 1+s) and clamps S; hue adds U(-s, s) radians to H (fmod 2pi, no clamp);
- Gaussian blur per image, sigma ~ U(0.15, 1.15), a (rows, columns) kernel from the crop's height and width (the
  DACS rule, about 0.1 x each side, odd), reflect padding.

Images here are (3, H, W) tensors, one at a time, as a reader of the paper would write it.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # kornia 0.2.0's transform list: an order is a permutation of these


@dataclasses.dataclass
class StrongAug:
    """The drawn strong augmentation of one batch of mixed images (B images)."""

    jitter: torch.Tensor  # (B,) bool: colour jitter applied to image b (one coin per step: all equal)
    factors: torch.Tensor  # (B, 4) float: brightness offset, contrast factor, saturation factor, hue shift (rad)
    order: torch.Tensor  # (B, 4) int64: the order image b applies BRIGHTNESS..HUE in
    blur: torch.Tensor  # (B,) bool: Gaussian blur applied to image b (one coin per step: all equal)
    sigma: torch.Tensor  # (B,) float: blur sigma of image b
    kernel_size: tuple[int, int]  # odd blur kernel size (rows, columns)


# ----------------------------------------------------------------------------------------------- drawing
def blur_kernel_size(length: int) -> int:
    """The DACS rule for one side: ceil(0.1 n), made odd by taking one off."""
    k = math.ceil(0.1 * length)
    if k % 2 == 0:
        k -= 1
    return max(k, 1)


def draw_strong_aug(batch: int, crop_hw: tuple[int, int], jitter: bool, blur: bool, strength: float,
                    gen: torch.Generator | None = None) -> StrongAug:
    """Each image's jitter factors, jitter order and blur sigma, under the step's two coins."""
    s = strength
    u = torch.rand(batch, 5, generator=gen)  # per image: four uniforms for the jitter, one for the sigma
    brightness = -s + 2 * s * u[:, 0]  # U(-s, s)
    contrast = 1 - s + 2 * s * u[:, 1]  # U(1-s, 1+s)
    saturation = 1 - s + 2 * s * u[:, 2]
    hue = -s + 2 * s * u[:, 3]  # radians
    orders = [torch.randperm(4, generator=gen) for _ in range(batch)]
    sigma = 0.15 + u[:, 4]  # U(0.15, 1.15)
    height, width = crop_hw
    return StrongAug(jitter=torch.full((batch,), bool(jitter)),
                     factors=torch.stack([brightness, contrast, saturation, hue], dim=1),
                     order=torch.stack(orders), blur=torch.full((batch,), bool(blur)), sigma=sigma,
                     kernel_size=(blur_kernel_size(height), blur_kernel_size(width)))


def draw_step_aug(batch: int, crop_hw: tuple[int, int], jitter_p: float, strength: float, blur_p: float,
                  gen: torch.Generator | None = None) -> tuple[StrongAug, StrongAug]:
    """(mixed source, mixed target) augmentation of one step: the script tosses its two coins once per step."""
    coins = torch.rand(2, generator=gen)
    jitter, blur = bool(coins[0] < jitter_p), bool(coins[1] < blur_p)
    aug_src = draw_strong_aug(batch, crop_hw, jitter, blur, strength, gen)
    aug_tgt = draw_strong_aug(batch, crop_hw, jitter, blur, strength, gen)
    return aug_src, aug_tgt


# ----------------------------------------------------------------------------------------------- colour
def rgb_to_hsv(img: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB -> (H in radians [0, 2pi), S, V), as kornia 0.2.0 (black: S = 0; grey: H = 0). The hue is the
    textbook sector formula, (g - b) / delta where red is the largest: kornia's bc - gc, with one rounding fewer."""
    r, g, b = img[0], img[1], img[2]
    maxc, minc = img.max(0).values, img.min(0).values
    v = maxc
    delta = maxc - minc
    s = delta / v
    s[torch.isnan(s)] = 0.0  # black pixels: 0 / 0
    delta = torch.where(delta == 0, torch.ones_like(delta), delta)
    h = (r - g) / delta + 4.0  # blue is the largest
    max_g, max_r = g == maxc, r == maxc
    h[max_g] = ((b - r) / delta + 2.0)[max_g]
    h[max_r] = (((g - b) / delta) % 6)[max_r]  # red wins a tie, as in kornia (written last)
    h[minc == maxc] = 0.0
    h = (h / 6.0) % 1.0
    return torch.stack([2 * math.pi * h, s, v])


def hsv_to_rgb(hsv: torch.Tensor, kornia_quirk: bool = False) -> torch.Tensor:
    """(3, H, W) (H radians, S, V) -> RGB by kornia 0.2.0's six hue sectors.

    kornia fills the sectors in turn into the tensor that holds the sector numbers (`out[out == k] = ...`), so the
    sector-1 pass also picks the sector-0 values that came out exactly 1.0 and overwrites them: that library bug,
    which the authors trained with, is `kornia_quirk`; without it each pixel takes its own sector's values."""
    h, s, v = hsv[0] / (2 * math.pi), hsv[1], hsv[2]
    hi = torch.floor(h * 6) % 6
    f = ((h * 6) % 6) - hi
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    sectors = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    if kornia_quirk:
        out = torch.stack([hi, hi, hi])
        for k, rgb in enumerate(sectors):
            hit = out == k
            out[hit] = torch.stack(rgb)[hit]
        return out
    out = torch.empty_like(hsv)
    for k, rgb in enumerate(sectors):
        hit = torch.stack([hi == k] * 3)
        out[hit] = torch.stack(rgb)[hit]
    return out


def adjust_brightness(img: torch.Tensor, b: float) -> torch.Tensor:
    return torch.clamp(img + b, 0.0, 1.0)


def adjust_contrast(img: torch.Tensor, c: float) -> torch.Tensor:
    return torch.clamp(img * c, 0.0, 1.0)


def adjust_saturation(img: torch.Tensor, factor: float, kornia_quirk: bool = False) -> torch.Tensor:
    h, s, v = rgb_to_hsv(img)
    s = torch.clamp(s * factor, 0.0, 1.0)
    return hsv_to_rgb(torch.stack([h, s, v]), kornia_quirk)


def adjust_hue(img: torch.Tensor, shift: float, kornia_quirk: bool = False) -> torch.Tensor:
    h, s, v = rgb_to_hsv(img)
    h = torch.fmod(h + shift, 2 * math.pi)  # kept negative when it is: the sectors wrap it
    return hsv_to_rgb(torch.stack([h, s, v]), kornia_quirk)


def color_jitter(img: torch.Tensor, factors: list[float], order: list[int], kornia_quirk: bool = False
                 ) -> torch.Tensor:
    """kornia 0.2.0's ColorJitter on one image with its drawn factors, in its drawn order. With kornia_quirk, as the
    authors' script ran it: their tensors were BGR, so kornia's channel 0, where the quirk strikes, was blue, and the
    hue shift moved BGR's hue."""
    if kornia_quirk:
        img = img[[2, 1, 0]]  # RGB -> BGR
    for op in order:
        if op == BRIGHTNESS:
            img = adjust_brightness(img, factors[BRIGHTNESS])
        elif op == CONTRAST:
            img = adjust_contrast(img, factors[CONTRAST])
        elif op == SATURATION:
            img = adjust_saturation(img, factors[SATURATION], kornia_quirk)
        else:
            img = adjust_hue(img, factors[HUE], kornia_quirk)
    return img[[2, 1, 0]] if kornia_quirk else img


# ----------------------------------------------------------------------------------------------- blur
def gaussian_1d(size: int, sigma: float) -> torch.Tensor:
    """kornia 0.2.0's normalised Gaussian window of `size` taps around the centre."""
    x = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def gaussian_blur(img: torch.Tensor, sigma: float, kernel_size: tuple[int, int]) -> torch.Tensor:
    """kornia 0.2.0's GaussianBlur2d on one (3, H, W) image: the 2-D kernel (rows x columns), reflect padding."""
    rows, cols = kernel_size
    kernel = torch.outer(gaussian_1d(rows, sigma), gaussian_1d(cols, sigma)).to(img)
    padded = F.pad(img[None], (cols // 2, cols // 2, rows // 2, rows // 2), mode="reflect")
    return F.conv2d(padded, kernel.expand(3, 1, rows, cols), groups=3)[0]


def strong_augment(x_B3HW: torch.Tensor, aug: StrongAug, kornia_hsv_quirk: bool = False) -> torch.Tensor:
    """Jitter, then blur, each mixed image whose coin came up; the others pass through unchanged."""
    out = []
    for b, img in enumerate(x_B3HW):
        if aug.jitter[b]:
            img = color_jitter(img, aug.factors[b].tolist(), aug.order[b].tolist(), kornia_hsv_quirk)
        if aug.blur[b]:
            img = gaussian_blur(img, float(aug.sigma[b]), aug.kernel_size)
        out.append(img)
    return torch.stack(out)
