"""Strong augmentation: identities, hand values, and the drawn-parameter semantics."""

import torch

from dsp_fast.augment import (
    blur_kernel_size,
    color_jitter,
    draw_strong_aug,
    gaussian_blur,
    hsv_to_rgb,
    rgb_to_hsv,
    strong_augment,
)


def test_hsv_roundtrip_and_known_colours():
    x = torch.rand(2, 3, 5, 7)
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5)  # fp32 rounding through division only
    red_green_blue = torch.eye(3).view(1, 3, 1, 3)
    assert torch.allclose(rgb_to_hsv(red_green_blue)[0, 0, 0], torch.tensor([0.0, 1 / 3, 2 / 3]))


def test_jitter_identity_and_hand_values():
    x = torch.rand(2, 3, 4, 4) * 0.5
    assert torch.allclose(color_jitter(x, torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 2)), x, atol=1e-5)
    bright = color_jitter(x, torch.tensor([[1.5, 1.0, 1.0, 0.0]] * 2))
    assert torch.allclose(bright, x * 1.5, atol=1e-5)
    gray = color_jitter(x, torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 2))  # saturation 0 -> grey
    assert torch.allclose(gray[:, 0], gray[:, 1], atol=1e-5) and torch.allclose(gray[:, 1], gray[:, 2], atol=1e-5)
    red = torch.zeros(1, 3, 1, 1)
    red[:, 0] = 1
    assert torch.allclose(color_jitter(red, torch.tensor([[1.0, 1.0, 1.0, 1 / 3]]))[0, :, 0, 0],
                          torch.tensor([0.0, 1.0, 0.0]), atol=1e-5)  # a third of a turn: red -> green


def test_blur():
    assert blur_kernel_size(512) == 51 and blur_kernel_size(128) == 13 and blur_kernel_size(130) == 13
    flat = torch.full((2, 3, 20, 20), 0.3)
    assert torch.allclose(gaussian_blur(flat, torch.tensor([0.5, 1.0]), 5), flat, atol=1e-6)
    impulse = torch.zeros(1, 1, 9, 9)
    impulse[..., 4, 4] = 1
    out = gaussian_blur(impulse.expand(1, 3, 9, 9).contiguous(), torch.tensor([1.0]), 5)
    assert abs(float(out[0, 0].sum()) - 1) < 1e-5 and out[0, 0, 4, 4] < 1 and out[0, 0, 4, 5] == out[0, 0, 4, 3]


def test_coins_select_images():
    x = torch.rand(4, 3, 16, 16)
    aug = draw_strong_aug(4, 16, jitter_p=1.0, strength=0.25, blur_p=0.0)
    aug.jitter = torch.tensor([True, False, True, False])
    y = strong_augment(x, aug)
    assert torch.equal(y[1], x[1]) and torch.equal(y[3], x[3]) and not torch.equal(y[0], x[0])
    never = draw_strong_aug(4, 16, jitter_p=0.0, strength=0.25, blur_p=0.0)
    assert torch.equal(strong_augment(x, never), x)
    f = draw_strong_aug(1000, 16, 0.8, 0.25, 0.5, torch.Generator().manual_seed(0))
    assert f.factors[:, :3].min() >= 0.75 and f.factors[:, :3].max() <= 1.25 and f.factors[:, 3].abs().max() <= 0.25
    assert 0.7 < f.jitter.float().mean() < 0.9 and 0.4 < f.blur.float().mean() < 0.6
    assert f.sigma.min() >= 0.15 and f.sigma.max() <= 1.15
