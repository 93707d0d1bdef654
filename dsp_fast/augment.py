"""Strong augmentation of the mixed images (DSP step 4), in plain PyTorch: colour jitter and Gaussian blur.

Parameters are drawn first (`draw_step_aug`) and applied after (`strong_augment`), so two implementations of a
step can be fed the same random choices. Semantics are those of the authors' script with kornia 0.2.0, on 0..1
RGB images (B, 3, H, W):

- one jitter coin (p = 0.8) and one blur coin (p = 0.5) per step, shared by every mixed image of the step;
- colour jitter per image: brightness *adds* b ~ U(-s, s), contrast *multiplies* by c ~ U(1-s, 1+s) (no blend to
  the mean), saturation multiplies HSV S by U(1-s, 1+s), hue adds U(-s, s) *radians* to H in [0, 2pi); the four
  in a random order per image; brightness and contrast clamp the image to [0, 1], saturation clamps S to [0, 1],
  hue clamps nothing (kornia 0.2.0's clamping);
- Gaussian blur per image: sigma ~ U(0.15, 1.15), an odd kernel of about 0.1 x the image size per axis (rows from
  the height, columns from the width, as the script's kornia GaussianBlur2d((k_y, k_x))), reflect padding;
- `kornia_hsv_quirk`: kornia 0.2.0's `hsv_to_rgb` fills the six hue sectors in turn with `out[out == k] = ...`, so a
  value that sector 0 wrote as exactly 1.0 is selected again by the sector-1 pass and overwritten (a library bug
  the authors trained with, reproduced on request).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # kornia 0.2.0's transform list order (the order's indices)
TWO_PI = 2 * math.pi


@dataclasses.dataclass
class StrongAug:
    jitter: torch.Tensor  # (B,) bool: colour jitter applied to image b (one coin per step: all equal)
    factors: torch.Tensor  # (B, 4) float: brightness offset, contrast factor, saturation factor, hue shift (rad)
    order: torch.Tensor  # (B, 4) int64: a permutation of BRIGHTNESS..HUE, the order the four are applied in
    blur: torch.Tensor  # (B,) bool: Gaussian blur applied to image b (one coin per step: all equal)
    sigma: torch.Tensor  # (B,) float: blur sigma
    kernel_size: tuple[int, int]  # odd blur kernel size (rows, columns)


def blur_kernel_size(length: int) -> int:
    """About 0.1 x an axis' length, odd (the DACS rule: ceil(0.1 n), minus one when even)."""
    k = math.ceil(0.1 * length)
    return max(1, k - 1 if k % 2 == 0 else k)


def blur_kernel_shape(height: int, width: int) -> tuple[int, int]:
    """(rows, columns) of the blur kernel: each axis from its own length, as the script computes k_y and k_x."""
    return blur_kernel_size(height), blur_kernel_size(width)


def draw_strong_aug(batch: int, crop_hw: tuple[int, int], jitter: bool, blur: bool, strength: float,
                    gen: torch.Generator | None = None) -> StrongAug:
    """Per-image jitter factors, jitter order and blur sigma for `batch` images of size crop_hw = (H, W), under the
    step's two coins."""
    u = torch.rand(batch, 5, generator=gen)
    s = strength
    factors = torch.stack([-s + 2 * s * u[:, 0], 1 - s + 2 * s * u[:, 1], 1 - s + 2 * s * u[:, 2],
                           -s + 2 * s * u[:, 3]], 1)
    order = torch.stack([torch.randperm(4, generator=gen) for _ in range(batch)])
    sigma = 0.15 + u[:, 4]  # U(0.15, 1.15)
    return StrongAug(torch.full((batch,), bool(jitter)), factors, order, torch.full((batch,), bool(blur)), sigma,
                     blur_kernel_shape(*crop_hw))


def draw_step_aug(batch: int, crop_hw: tuple[int, int], jitter_p: float, strength: float, blur_p: float,
                  gen: torch.Generator | None = None) -> tuple[StrongAug, StrongAug]:
    """A step's augmentation of the mixed source and mixed target images: the two coins drawn once and shared
    (the script draws them once per step), everything else per image."""
    coins = torch.rand(2, generator=gen)
    jitter, blur = bool(coins[0] < jitter_p), bool(coins[1] < blur_p)
    return (draw_strong_aug(batch, crop_hw, jitter, blur, strength, gen),
            draw_strong_aug(batch, crop_hw, jitter, blur, strength, gen))


# ---------------------------------------------------------------------------------------------- colour space
def rgb_to_hsv(x_B3HW: torch.Tensor) -> torch.Tensor:
    """RGB in 0..1 -> (H in radians [0, 2pi), S, V), as kornia 0.2.0 (S = 0 where V = 0, H = 0 where grey)."""
    r, g, b = x_B3HW.unbind(1)
    maxc, _ = x_B3HW.max(1)
    minc, _ = x_B3HW.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, ((g - b) / safe) % 6, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(delta > 0, (h / 6) % 1.0, torch.zeros_like(h)) * TWO_PI
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack([h, s, maxc], 1)


def hsv_to_rgb(x_B3HW: torch.Tensor, kornia_quirk: bool = False) -> torch.Tensor:
    """(H radians, S, V) -> RGB; H may lie outside [0, 2pi) (it wraps), as kornia's floor(6h) % 6 sectors.

    kornia_quirk: kornia 0.2.0's result. Its sector-1 pass (`out[out == 1] = (q, v, p)[...]`) also selects the
    sector-0 values that came out exactly 1.0. In sector 0, (R, G, B) = (v, t, p): R is 1.0 exactly when v is, and
    becomes q = v (1 - f s); G = t is 1.0 only when v = 1 too, and becomes v: unchanged; B = p becomes p."""
    h, s, v = x_B3HW.unbind(1)
    h6 = h * (6 / TWO_PI)

    def channel(n: float) -> torch.Tensor:
        k = (n + h6) % 6
        return v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1)

    r = channel(5)
    if kornia_quirk:
        turns6 = torch.remainder(h6, 6)  # kornia: hi = floor(6h) % 6, f = (6h) % 6 - hi
        sector = torch.floor(turns6)
        q = v * (1 - (turns6 - sector) * s)
        r = torch.where((sector == 0) & (r == 1.0), q, r)
    return torch.stack([r, channel(3), channel(1)], 1)


def _per_image(f_B: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return f_B.to(x).view(-1, 1, 1, 1)


def adjust_brightness(x_B3HW: torch.Tensor, b_B: torch.Tensor) -> torch.Tensor:
    """kornia 0.2.0: x + b, clamped to [0, 1]."""
    return (x_B3HW + _per_image(b_B, x_B3HW)).clamp(0, 1)


def adjust_contrast(x_B3HW: torch.Tensor, c_B: torch.Tensor) -> torch.Tensor:
    """kornia 0.2.0: x * c, clamped to [0, 1] (no blend towards the mean grey)."""
    return (x_B3HW * _per_image(c_B, x_B3HW)).clamp(0, 1)


def adjust_saturation(x_B3HW: torch.Tensor, s_B: torch.Tensor, kornia_quirk: bool = False) -> torch.Tensor:
    """kornia 0.2.0: HSV S times s, clamped to [0, 1]."""
    h, s, v = rgb_to_hsv(x_B3HW).unbind(1)
    s = (s * _per_image(s_B, x_B3HW)[:, 0]).clamp(0, 1)
    return hsv_to_rgb(torch.stack([h, s, v], 1), kornia_quirk)


def adjust_hue(x_B3HW: torch.Tensor, h_B: torch.Tensor, kornia_quirk: bool = False) -> torch.Tensor:
    """kornia 0.2.0: H + h radians, modulo 2pi; no clamping."""
    h, s, v = rgb_to_hsv(x_B3HW).unbind(1)
    h = torch.fmod(h + _per_image(h_B, x_B3HW)[:, 0], TWO_PI)  # may be negative: hsv_to_rgb wraps it, as kornia
    return hsv_to_rgb(torch.stack([h, s, v], 1), kornia_quirk)


ADJUST = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # indexed by BRIGHTNESS..HUE


def color_jitter(x_B3HW: torch.Tensor, factors_B4: torch.Tensor, order_B4: torch.Tensor,
                 kornia_quirk: bool = False) -> torch.Tensor:
    """kornia 0.2.0's ColorJitter with drawn factors: image by image, the four adjustments in that image's order."""
    out = []
    for b in range(x_B3HW.shape[0]):
        x = x_B3HW[b:b + 1]
        for idx in order_B4[b].tolist():
            f = factors_B4[b:b + 1, idx]
            x = ADJUST[idx](x, f, kornia_quirk) if idx in (SATURATION, HUE) else ADJUST[idx](x, f)
        out.append(x)
    return torch.cat(out)


def gaussian_blur(x_B3HW: torch.Tensor, sigma_B: torch.Tensor, kernel_size: tuple[int, int]) -> torch.Tensor:
    """Separable Gaussian blur, one sigma per image, kernel_size (rows, columns), reflect padding (each axis'
    kernel capped below that axis' length, as reflect padding needs)."""
    b, c, h, w = x_B3HW.shape
    ky, kx = (min(k, 2 * ((n - 1) // 2) + 1) for k, n in zip(kernel_size, (h, w)))
    if ky < 3 and kx < 3:
        return x_B3HW
    y = F.pad(x_B3HW.reshape(1, b * c, h, w), (kx // 2, kx // 2, ky // 2, ky // 2), mode="reflect")
    for k, shape in ((kx, (1, kx)), (ky, (ky, 1))):  # columns, then rows
        pos = torch.arange(k, dtype=x_B3HW.dtype, device=x_B3HW.device) - k // 2
        kern = torch.exp(-(pos[None] ** 2) / (2 * sigma_B.to(x_B3HW)[:, None] ** 2))
        kern = kern / kern.sum(1, keepdim=True)  # (B, k)
        weight = kern.repeat_interleave(c, 0)  # one kernel per (image, channel) group
        y = F.conv2d(y, weight.view(b * c, 1, *shape), groups=b * c)
    return y.view(b, c, h, w)


def strong_augment(x_B3HW: torch.Tensor, aug: StrongAug, kornia_hsv_quirk: bool = False) -> torch.Tensor:
    """Apply the drawn jitter and blur; images whose coin came up false pass through unchanged."""
    jit = aug.jitter.to(x_B3HW.device).view(-1, 1, 1, 1)
    x = x_B3HW
    if bool(aug.jitter.any()):
        x = torch.where(jit, color_jitter(x_B3HW, aug.factors, aug.order, kornia_hsv_quirk), x_B3HW)
    if bool(aug.blur.any()):
        blur = aug.blur.to(x.device).view(-1, 1, 1, 1)
        x = torch.where(blur, gaussian_blur(x, aug.sigma, aug.kernel_size), x)
    return x
