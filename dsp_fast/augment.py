"""Strong augmentation of the mixed images (DSP step 4) on the device: colour jitter and Gaussian blur with fixed
shapes and no host branch, so the step can be captured in a CUDA graph. The semantics are kornia 0.2.0's as the
authors' script ran them, on 0..1 RGB images (B, 3, H, W): docs/method.md, step 4, and the reference's image-by-image
version (dsp_fast/reference/strong_aug.py) list them; `kornia_hsv_quirk` reproduces kornia 0.2.0's `hsv_to_rgb`
bug (a value sector 0 wrote as exactly 1.0 is overwritten by the sector-1 pass), which the authors trained with.

The random choices arrive as a table of AUG_COLS columns per image (drawn by `dsp_fast.method.draw_choices_`); both
implementations are tested against values worked out by hand (tests/test_augment.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # kornia 0.2.0's transform list order (the order's indices)
TWO_PI = 2 * math.pi
AUG_COLS = 11
"""Columns of an augmentation table (B, AUG_COLS): [jitter coin, brightness offset, contrast, saturation, hue (rad),
blur coin, sigma, 4 order keys]: the jitter order of an image is argsort of its keys (a uniform random permutation)."""


def blur_kernel_size(length: int) -> int:
    """About 0.1 x an axis' length, odd (the DACS rule: ceil(0.1 n), minus one when even)."""
    k = math.ceil(0.1 * length)
    return max(1, k - 1 if k % 2 == 0 else k)


def blur_kernel_shape(height: int, width: int) -> tuple[int, int]:
    """(rows, columns) of the blur kernel: each axis from its own length, as the script computes k_y and k_x."""
    return blur_kernel_size(height), blur_kernel_size(width)


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

    kornia_quirk: kornia 0.2.0's result on its channel 0 (R below; blue in the script, see color_jitter). Its
    sector-1 pass (`out[out == 1] = (q, v, p)[...]`) also selects the sector-0 values that came out exactly 1.0. In
    sector 0, (R, G, B) = (v, t, p): R is 1.0 exactly when v is, and becomes q = v (1 - f s); G = t is 1.0 only when
    v = 1 too, and becomes v: unchanged; B = p becomes p."""
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


def color_jitter(x_B3HW: torch.Tensor, factors_B4: torch.Tensor, order_B4: torch.Tensor,
                 kornia_quirk: bool = False) -> torch.Tensor:
    """kornia 0.2.0's ColorJitter with drawn factors (B, 4: brightness offset, contrast, saturation, hue) and orders
    (B, 4, a permutation of BRIGHTNESS..HUE per image), with fixed shapes: four stages; at stage j every image applies
    its order[:, j]-th adjustment. Brightness and contrast are one affine map per image,
    clamp(x * c + b) with (1, b) or (c, 0); saturation and hue one HSV round trip with (s, 0) or (1, h): two
    evaluations per stage instead of four, bit for bit the four applied one at a time (x * 1, + 0, fmod(h + 0) and
    s * 1 are exact). kornia_quirk: as the script ran it, on the BGR tensors it handed kornia (the quirk hits kornia's
    channel 0, blue; the hue moves +h on BGR); without it RGB, +h (the same distribution: h is symmetric)."""
    b, c, s, h = factors_B4.to(x_B3HW).unbind(1)
    one, zero = torch.ones_like(b), torch.zeros_like(b)
    x = x_B3HW.flip(1) if kornia_quirk else x_B3HW
    for j in range(4):
        op = order_B4[:, j]
        mul = torch.where(op == CONTRAST, c, one)
        add = torch.where(op == BRIGHTNESS, b, zero)
        affine = (x * mul.view(-1, 1, 1, 1) + add.view(-1, 1, 1, 1)).clamp(0, 1)
        hue, sat, val = rgb_to_hsv(x).unbind(1)
        sat = (sat * torch.where(op == SATURATION, s, one).view(-1, 1, 1)).clamp(0, 1)
        hue = torch.fmod(hue + torch.where(op == HUE, h, zero).view(-1, 1, 1), TWO_PI)
        hsv = hsv_to_rgb(torch.stack([hue, sat, val], 1), kornia_quirk)
        x = torch.where(((op == BRIGHTNESS) | (op == CONTRAST)).view(-1, 1, 1, 1), affine, hsv)
    return x.flip(1) if kornia_quirk else x


def strong_augment(x_B3HW: torch.Tensor, aug: torch.Tensor, kernel_size: tuple[int, int],
                   kornia_hsv_quirk: bool = False) -> torch.Tensor:
    """Step 4's colour jitter and blur, computed for every image and selected per image by its coin: no
    data-dependent branch, so it can be captured. aug: (B, AUG_COLS), see AUG_COLS; kernel_size (rows, cols)."""
    order = aug[:, 7:11].argsort(dim=1)
    jit = aug[:, 0].bool().view(-1, 1, 1, 1)
    x = torch.where(jit, color_jitter(x_B3HW, aug[:, 1:5], order, kornia_hsv_quirk), x_B3HW)
    blur = aug[:, 5].bool().view(-1, 1, 1, 1)
    return torch.where(blur, gaussian_blur(x, aug[:, 6], kernel_size), x)
