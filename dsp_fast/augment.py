"""Strong augmentation of the mixed images (DSP step 4), in plain PyTorch: colour jitter and Gaussian blur.

Parameters are drawn first (`draw_strong_aug`) and applied after (`strong_augment`), so two implementations of a
step can be fed the same random choices. Semantics follow torchvision's ColorJitter (multiplicative brightness,
contrast and saturation factors in [1-s, 1+s], hue shift in [-s, s] turns, applied in 0..1 RGB space, in that
order) and the DACS blur (sigma ~ U(0.15, 1.15), odd kernel of about 0.1 x the image height, reflect padding).
Image tensors are (B, 3, H, W) RGB floats in 0..1.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

_GRAY = (0.299, 0.587, 0.114)


@dataclasses.dataclass
class StrongAug:
    jitter: torch.Tensor  # (B,) bool: colour jitter applied to image b
    factors: torch.Tensor  # (B, 4) float: brightness, contrast, saturation factors and hue shift
    blur: torch.Tensor  # (B,) bool: Gaussian blur applied to image b
    sigma: torch.Tensor  # (B,) float: blur sigma
    kernel_size: int  # odd blur kernel size


def blur_kernel_size(height: int) -> int:
    """About 0.1 x height, odd (the DACS rule: ceil(0.1 H), minus one when even)."""
    k = math.ceil(0.1 * height)
    return max(1, k - 1 if k % 2 == 0 else k)


def draw_strong_aug(batch: int, height: int, jitter_p: float, strength: float, blur_p: float,
                    gen: torch.Generator | None = None) -> StrongAug:
    u = torch.rand(batch, 6, generator=gen)
    factors = torch.empty(batch, 4)
    factors[:, :3] = 1 - strength + 2 * strength * u[:, :3]
    factors[:, 3] = -strength + 2 * strength * u[:, 3]
    jitter = torch.rand(batch, generator=gen) < jitter_p
    blur = torch.rand(batch, generator=gen) < blur_p
    sigma = 0.15 + u[:, 4]  # U(0.15, 1.15)
    return StrongAug(jitter, factors, blur, sigma, blur_kernel_size(height))


def grayscale(x_B3HW: torch.Tensor) -> torch.Tensor:
    r, g, b = x_B3HW.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def rgb_to_hsv(x_B3HW: torch.Tensor) -> torch.Tensor:
    r, g, b = x_B3HW.unbind(1)
    maxc, _ = x_B3HW.max(1)
    minc, _ = x_B3HW.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, ((g - b) / safe) % 6, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack([h, s, maxc], 1)


def hsv_to_rgb(x_B3HW: torch.Tensor) -> torch.Tensor:
    h, s, v = x_B3HW.unbind(1)

    def channel(n: float) -> torch.Tensor:
        k = (n + h * 6) % 6
        return v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1)

    return torch.stack([channel(5), channel(3), channel(1)], 1)


def color_jitter(x_B3HW: torch.Tensor, factors_B4: torch.Tensor) -> torch.Tensor:
    f = factors_B4.to(x_B3HW).view(-1, 4, 1, 1, 1).unbind(1)
    x = (x_B3HW * f[0]).clamp(0, 1)
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (f[1] * x + (1 - f[1]) * mean).clamp(0, 1)
    x = (f[2] * x + (1 - f[2]) * grayscale(x)).clamp(0, 1)
    hsv = rgb_to_hsv(x)
    hsv = torch.cat([(hsv[:, :1] + f[3]) % 1.0, hsv[:, 1:]], 1)
    return hsv_to_rgb(hsv).clamp(0, 1)


def gaussian_blur(x_B3HW: torch.Tensor, sigma_B: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur, one sigma per image, reflect padding (kernel capped below the image size)."""
    b, c, h, w = x_B3HW.shape
    k = min(kernel_size, 2 * ((min(h, w) - 1) // 2) + 1)
    if k < 3:
        return x_B3HW
    pos = torch.arange(k, dtype=x_B3HW.dtype, device=x_B3HW.device) - k // 2
    kern = torch.exp(-(pos[None] ** 2) / (2 * sigma_B.to(x_B3HW)[:, None] ** 2))
    kern = kern / kern.sum(1, keepdim=True)  # (B, k)
    weight = kern.repeat_interleave(c, 0)  # one kernel per (image, channel) group
    y = F.pad(x_B3HW.reshape(1, b * c, h, w), (k // 2, k // 2, k // 2, k // 2), mode="reflect")
    y = F.conv2d(y, weight.view(b * c, 1, 1, k), groups=b * c)
    y = F.conv2d(y, weight.view(b * c, 1, k, 1), groups=b * c)
    return y.view(b, c, h, w)


def strong_augment(x_B3HW: torch.Tensor, aug: StrongAug) -> torch.Tensor:
    """Apply the drawn jitter and blur; images whose coin came up false pass through unchanged."""
    jit = aug.jitter.to(x_B3HW.device).view(-1, 1, 1, 1)
    x = torch.where(jit, color_jitter(x_B3HW, aug.factors), x_B3HW) if bool(aug.jitter.any()) else x_B3HW
    if bool(aug.blur.any()):
        blur = aug.blur.to(x.device).view(-1, 1, 1, 1)
        x = torch.where(blur, gaussian_blur(x, aug.sigma, aug.kernel_size), x)
    return x
