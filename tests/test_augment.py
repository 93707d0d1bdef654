"""Strong augmentation against values worked out by hand from kornia 0.2.0's formulas (kornia is not a dependency),
the blur, and the drawn-parameter semantics (shared coins, per-image factors and order).

kornia 0.2.0, on 0..1 RGB: brightness x + b, clamp [0, 1]; contrast x * c, clamp [0, 1]; saturation: HSV S * s,
clamp [0, 1]; hue: H (radians) + h, fmod 2pi, no clamp; HSV -> RGB by the sectors hi = floor(6 H / 2pi) % 6,
f = (6 H / 2pi) % 6 - hi, p = v(1-s), q = v(1-fs), t = v(1-(1-f)s). Tolerance 1e-5: float32 rounding through a
division and a few products.

The hand-worked values are the oracle of both implementations: the fast path's (dsp_fast.augment, batched, staged)
and the reference's own (dsp_fast.reference.strong_aug, image by image), so neither trainer checks the other alone.
"""

import math

import pytest
import torch

from dsp_fast.augment import (
    AUG_COLS,
    BRIGHTNESS,
    CONTRAST,
    HUE,
    SATURATION,
    blur_kernel_shape,
    blur_kernel_size,
    color_jitter,
    gaussian_blur,
    hsv_to_rgb,
    rgb_to_hsv,
    strong_augment,
)
from dsp_fast.config import DSPConfig
from dsp_fast.method import DeviceChoices, draw_choices_
from dsp_fast.reference import strong_aug as ref_aug


class Reference:
    """The reference's per-image primitives behind the fast path's batched signatures."""

    @staticmethod
    def _each(fn, x, *per_image):
        return torch.stack([fn(img, *(p[b] for p in per_image)) for b, img in enumerate(x)])

    @staticmethod
    def rgb_to_hsv(x):
        return Reference._each(ref_aug.rgb_to_hsv, x)

    @staticmethod
    def hsv_to_rgb(x, kornia_quirk=False):
        return torch.stack([ref_aug.hsv_to_rgb(img, kornia_quirk) for img in x])

    @staticmethod
    def adjust_brightness(x, f):
        return Reference._each(ref_aug.adjust_brightness, x, f.tolist())

    @staticmethod
    def adjust_contrast(x, f):
        return Reference._each(ref_aug.adjust_contrast, x, f.tolist())

    @staticmethod
    def adjust_saturation(x, f, kornia_quirk=False):
        return Reference._each(lambda img, v: ref_aug.adjust_saturation(img, v, kornia_quirk), x, f.tolist())

    @staticmethod
    def adjust_hue(x, f, kornia_quirk=False):
        return Reference._each(lambda img, v: ref_aug.adjust_hue(img, v, kornia_quirk), x, f.tolist())

    @staticmethod
    def color_jitter(x, factors, order, kornia_quirk=False):
        return Reference._each(lambda img, f, o: ref_aug.color_jitter(img, f, o, kornia_quirk), x, factors.tolist(),
                               order.tolist())

    @staticmethod
    def gaussian_blur(x, sigma, kernel_size):
        return Reference._each(lambda img, s: ref_aug.gaussian_blur(img, s, kernel_size), x, sigma.tolist())


IDENTITY = (0.0, 1.0, 1.0, 0.0)  # brightness offset, contrast, saturation, hue: each adjustment's identity


def _one_adjustment(op: int):
    """The fast path's jitter with one adjustment (op) at the given factors and the other three at their identity
    (exact but for fp32 rounding in the HSV round trip: within the tests' 1e-5)."""
    def adjust(x, f, kornia_quirk=False):
        factors = torch.tensor(IDENTITY).repeat(x.shape[0], 1)
        factors[:, op] = f
        order = torch.tensor([op, *(o for o in range(4) if o != op)]).repeat(x.shape[0], 1)
        return color_jitter(x, factors, order, kornia_quirk)
    return staticmethod(adjust)


class Fast:
    rgb_to_hsv, hsv_to_rgb = staticmethod(rgb_to_hsv), staticmethod(hsv_to_rgb)
    adjust_brightness, adjust_contrast = _one_adjustment(BRIGHTNESS), _one_adjustment(CONTRAST)
    adjust_saturation, adjust_hue = _one_adjustment(SATURATION), _one_adjustment(HUE)
    color_jitter, gaussian_blur = staticmethod(color_jitter), staticmethod(gaussian_blur)


both = pytest.mark.parametrize("aug", [Fast, Reference], ids=["fast", "reference"])


def px(*rgb: float) -> torch.Tensor:
    return torch.tensor(rgb).view(1, 3, 1, 1)


def close(got: torch.Tensor, *want: float) -> None:
    assert torch.allclose(got.flatten(), torch.tensor(want), atol=1e-5), (got.flatten().tolist(), want)


@both
def test_hsv_roundtrip_and_radians(aug):
    x = torch.rand(2, 3, 5, 7)
    assert torch.allclose(aug.hsv_to_rgb(aug.rgb_to_hsv(x)), x, atol=1e-5)  # fp32 rounding through division only
    red_green_blue = torch.eye(3).view(1, 3, 1, 3)
    thirds = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3])
    assert torch.allclose(aug.rgb_to_hsv(red_green_blue)[0, 0, 0], thirds)
    # (0.8, 0.4, 0.2): V = 0.8, S = 0.6 / 0.8, H = (g - b) / delta / 6 turns = 1/18 turn = pi/9 rad
    close(aug.rgb_to_hsv(px(0.8, 0.4, 0.2)), math.pi / 9, 0.75, 0.8)
    close(aug.rgb_to_hsv(px(0.0, 0.0, 0.0)), 0.0, 0.0, 0.0)  # black: S = 0 (kornia's NaN -> 0), H = 0


@both
def test_brightness_adds_and_contrast_multiplies_without_blend(aug):
    x = px(0.8, 0.4, 0.2)
    close(aug.adjust_brightness(x, torch.tensor([0.1])), 0.9, 0.5, 0.3)
    close(aug.adjust_brightness(x, torch.tensor([0.25])), 1.0, 0.65, 0.45)  # clamped at 1
    close(aug.adjust_brightness(x, torch.tensor([-0.25])), 0.55, 0.15, 0.0)  # clamped at 0
    close(aug.adjust_contrast(x, torch.tensor([0.75])), 0.6, 0.3, 0.15)  # a blend to the mean would give 0.65, ...
    close(aug.adjust_contrast(x, torch.tensor([1.25])), 1.0, 0.5, 0.25)


@both
def test_saturation_scales_hsv_s(aug):
    # S 0.75 -> 0.375, H = pi/9 (sector 0, f = 1/3), V = 0.8: (v, t, p) = (0.8, 0.8 (1 - 2/3 0.375), 0.8 (1 - 0.375))
    close(aug.adjust_saturation(px(0.8, 0.4, 0.2), torch.tensor([0.5])), 0.8, 0.6, 0.5)
    # S 0.9 * 1.25 clamped to 1: p = 0, f = 4/9, t = 1 - (1 - 4/9) = 4/9
    close(aug.adjust_saturation(px(1.0, 0.5, 0.1), torch.tensor([1.25])), 1.0, 4 / 9, 0.0)


@both
def test_hue_shifts_radians_and_wraps_like_kornia(aug):
    # H = pi/9 + 0.25 rad: 6H/2pi = 0.572066 (sector 0, f = 0.572066); t = 0.8 (1 - (1 - f) 0.75) = 0.5432396
    close(aug.adjust_hue(px(0.8, 0.4, 0.2), torch.tensor([0.25])), 0.8, 0.5432396, 0.2)
    # H = 0 - 0.25 rad: fmod keeps it negative; floor(-0.238732) % 6 = sector 5, f = 0.761268, S = 0.8, V = 1:
    # (v, p, q) = (1, 0.2, 1 - 0.761268 * 0.8)
    close(aug.adjust_hue(px(1.0, 0.2, 0.2), torch.tensor([-0.25])), 1.0, 0.2, 1 - 0.761268 * 0.8)
    # 0.25 turns (the old reading) would have moved this red pixel to chartreuse; 0.25 rad barely moves it
    assert float(aug.adjust_hue(px(1.0, 0.2, 0.2), torch.tensor([0.25]))[0, 1]) < 0.4


@both
def test_jitter_order_is_per_image(aug):
    grey = px(0.5, 0.5, 0.5).expand(2, 3, 1, 1).clone()
    factors = torch.tensor([[0.25, 1.25, 1.0, 0.0]] * 2)
    order = torch.tensor([[BRIGHTNESS, CONTRAST, SATURATION, HUE], [CONTRAST, BRIGHTNESS, HUE, SATURATION]])
    out = aug.color_jitter(grey, factors, order)
    close(out[0], 0.9375, 0.9375, 0.9375)  # (0.5 + 0.25) * 1.25
    close(out[1], 0.875, 0.875, 0.875)  # 0.5 * 1.25 + 0.25
    ident = torch.tensor([[0.0, 1.0, 1.0, 0.0]] * 2)
    x = torch.rand(2, 3, 4, 4)
    assert torch.allclose(aug.color_jitter(x, ident, order), x, atol=1e-5)


def test_fast_jitter_equals_the_reference_image_by_image():
    # the staged jitter against the reference's own image-by-image implementation on random factors and orders; 64
    # images cover many of the 24 orders; 2e-6 (a few fp32 ulps): the same formulas in another arrangement
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(64, 3, 8, 8, generator=gen)
    drawn = ref_aug.draw_strong_aug(64, (8, 8), jitter=True, blur=False, strength=0.25, gen=gen)
    torch.testing.assert_close(color_jitter(x, drawn.factors, drawn.order),
                               Reference.color_jitter(x, drawn.factors, drawn.order), rtol=0, atol=2e-6)


@both
def test_blur(aug):
    assert blur_kernel_size(512) == 51 and blur_kernel_size(128) == 13 and blur_kernel_size(130) == 13
    flat = torch.full((2, 3, 20, 20), 0.3)
    assert torch.allclose(aug.gaussian_blur(flat, torch.tensor([0.5, 1.0]), (5, 5)), flat, atol=1e-6)
    impulse = torch.zeros(1, 1, 9, 9)
    impulse[..., 4, 4] = 1
    out = aug.gaussian_blur(impulse.expand(1, 3, 9, 9).contiguous(), torch.tensor([1.0]), (5, 5))
    assert abs(float(out[0, 0].sum()) - 1) < 1e-5 and out[0, 0, 4, 4] < 1 and out[0, 0, 4, 5] == out[0, 0, 4, 3]
    # the centre tap of a 5-tap kernel at sigma 1: exp(0) / sum_k exp(-k^2 / 2), squared (separable)
    centre = 1 / sum(math.exp(-k * k / 2) for k in range(-2, 3))
    assert float(out[0, 0, 4, 4]) == pytest.approx(centre ** 2, rel=1e-5)


def _choices(batch: int) -> DeviceChoices:
    return DeviceChoices(class_u=torch.zeros(batch, 19), lt_img=torch.zeros(0), lt_label=torch.zeros(0),
                         lt_cls=torch.zeros(0), aug_src=torch.zeros(batch, AUG_COLS),
                         aug_tgt=torch.zeros(batch, AUG_COLS))


def test_drawn_choices_share_the_coins_per_step_with_their_distributions():
    """draw_choices_ over 1000 steps: one jitter coin and one blur coin per step, shared by both mixed batches, with
    frequencies 0.8 and 0.5 (3 sigma: 0.04 and 0.05); per image factors in their ranges, sigma in [0.15, 1.15], and
    order keys whose argsort reaches all 24 orders."""
    gen = torch.Generator().manual_seed(0)
    d = DSPConfig()
    ch = _choices(4)
    jit, blur, rows = [], [], []
    for _ in range(1000):
        draw_choices_(ch, gen, d)
        coins = torch.cat([ch.aug_src[:, [0, 5]], ch.aug_tgt[:, [0, 5]]])
        assert (coins == coins[0]).all()
        jit.append(bool(coins[0, 0]))
        blur.append(bool(coins[0, 1]))
        rows.append(ch.aug_tgt.clone())
    assert abs(sum(jit) / 1000 - 0.8) < 0.04 and abs(sum(blur) / 1000 - 0.5) < 0.05
    f = torch.cat(rows)
    s = d.jitter_strength
    assert f[:, [1, 4]].abs().max() <= s and f[:, [1, 4]].abs().max() > 0.9 * s  # offsets, the hue in radians
    assert f[:, 2:4].min() >= 1 - s and f[:, 2:4].max() <= 1 + s
    assert f[:, 6].min() >= 0.15 and f[:, 6].max() <= 1.15
    assert len(torch.unique(f[:, 7:11].argsort(dim=1), dim=0)) == 24


def test_strong_augment_follows_each_images_coins():
    x = torch.rand(4, 3, 16, 16)
    ch = _choices(4)
    draw_choices_(ch, torch.Generator().manual_seed(0), DSPConfig())
    aug = ch.aug_src.clone()
    aug[:, [0, 5]] = 0.0
    assert torch.equal(strong_augment(x, aug, (3, 3)), x)  # no coin: the images pass through, bit for bit
    aug[1, 0] = 1.0  # image 1 jittered only
    out = strong_augment(x, aug, (3, 3))
    assert not torch.equal(out[1], x[1]) and torch.equal(out[[0, 2, 3]], x[[0, 2, 3]])
    aug[1, 0], aug[2, 5] = 0.0, 1.0  # image 2 blurred only
    out = strong_augment(x, aug, (3, 3))
    torch.testing.assert_close(out[2:3], gaussian_blur(x[2:3], aug[2:3, 6], (3, 3)), rtol=0, atol=0)
    assert torch.equal(out[[0, 1, 3]], x[[0, 1, 3]])


@pytest.mark.parametrize("quirk", [False, True])
def test_one_call_over_both_mixed_batches_is_two_calls_bit_for_bit(quirk):
    """dsp_mix augments the mixed source and target batches in one call over their concatenation: every image's
    colour jitter and blur (odd crop, coins on for both) come out as from its own batch's call. The jitter is
    elementwise; the blur's grouped convolution sums each channel alone, which on the CPUs tried gives the same bits,
    and the tolerance leaves a vectorised library room to sum in another order."""
    xs, xt = torch.rand(3, 3, 21, 19), torch.rand(3, 3, 21, 19)
    ch = _choices(3)
    for seed in range(4):
        draw_choices_(ch, torch.Generator().manual_seed(seed), DSPConfig())
        ch.aug_src[:, [0, 5]], ch.aug_tgt[:, [0, 5]] = 1.0, 1.0
        both = strong_augment(torch.cat([xs, xt]), torch.cat([ch.aug_src, ch.aug_tgt]), (3, 5), quirk)
        torch.testing.assert_close(both[:3], strong_augment(xs, ch.aug_src, (3, 5), quirk), rtol=0, atol=1e-6)
        torch.testing.assert_close(both[3:], strong_augment(xt, ch.aug_tgt, (3, 5), quirk), rtol=0, atol=1e-6)


@both
def test_kornia_hsv_quirk_overwrites_sector_0_values_of_exactly_one_in_channel_0(aug):
    # kornia's own channel order: (1, 0.5, 0): V = 1, S = 1, H = 1/12 turn (sector 0, f = 0.5): kornia 0.2.0's sector
    # pass 0 writes (v, t, p) = (1, 0.5, 0); pass 1 selects every value equal to 1, so channel 0 becomes
    # q = v (1 - f s) = 0.5
    x = px(1.0, 0.5, 0.0)
    close(aug.hsv_to_rgb(aug.rgb_to_hsv(x)), 1.0, 0.5, 0.0)
    close(aug.hsv_to_rgb(aug.rgb_to_hsv(x), kornia_quirk=True), 0.5, 0.5, 0.0)
    # below 1.0, or outside sector 0, nothing changes: (0.9, 0.45, 0) (sector 0, V = 0.9) and (0.5, 1, 0) (sector 1)
    for other in (px(0.9, 0.45, 0.0), px(0.5, 1.0, 0.0), px(1.0, 0.0, 0.5)):
        hsv = aug.rgb_to_hsv(other)
        assert torch.equal(aug.hsv_to_rgb(hsv, kornia_quirk=True), aug.hsv_to_rgb(hsv))


@both
def test_the_jitter_quirk_hits_blue_as_the_script_ran_it(aug):
    # the script hands kornia BGR tensors, so kornia's channel 0 is blue: through the jitter (saturation by 1, hue by
    # 0, each alone an identity but for the quirk), RGB (0, 0.5, 1) goes to (0, 0.5, 0.5) and RGB (1, 0.5, 0) is
    # left exact
    blue, red = px(0.0, 0.5, 1.0), px(1.0, 0.5, 0.0)
    identity = torch.tensor([IDENTITY])
    for op in (SATURATION, HUE):
        order = torch.tensor([[op, *(o for o in range(4) if o != op)]])
        close(aug.color_jitter(blue, identity, order, kornia_quirk=True), 0.0, 0.5, 0.5)
        close(aug.color_jitter(red, identity, order, kornia_quirk=True), 1.0, 0.5, 0.0)
        close(aug.color_jitter(blue, identity, order), 0.0, 0.5, 1.0)


@both
def test_the_jitter_quirk_moves_the_hue_of_bgr_as_the_script(aug):
    # hue + h on the BGR tensor is hue - h on RGB (the hue circle mirrored): with the quirk (BGR, as the script) a
    # shift of +0.25 rad equals the plain RGB jitter's -0.25 rad, on pixels the quirk leaves alone (no value 1.0)
    x = px(0.8, 0.4, 0.2).expand(1, 3, 1, 1).clone()
    order = torch.tensor([[HUE, BRIGHTNESS, CONTRAST, SATURATION]])
    shifted = aug.color_jitter(x, torch.tensor([[0.0, 1.0, 1.0, 0.25]]), order, kornia_quirk=True)
    mirrored = aug.color_jitter(x, torch.tensor([[0.0, 1.0, 1.0, -0.25]]), order)
    torch.testing.assert_close(shifted, mirrored, rtol=0, atol=1e-5)
    assert not torch.allclose(shifted, aug.color_jitter(x, torch.tensor([[0.0, 1.0, 1.0, 0.25]]), order), atol=1e-3)


@both
def test_blur_kernel_per_axis(aug):
    # the script's kornia GaussianBlur2d((k_y, k_x)): ceil(3.7) = 4 -> 3 rows, ceil(4.5) = 5 -> 5 columns
    assert blur_kernel_shape(37, 45) == (3, 5)
    assert ref_aug.draw_strong_aug(2, (37, 45), False, True, 0.25).kernel_size == (3, 5)  # the reference's own
    impulse = torch.zeros(1, 3, 37, 45)
    impulse[..., 18, 22] = 1
    sigma = 0.8
    out = aug.gaussian_blur(impulse, torch.tensor([sigma]), (3, 5))[0, 0]
    # by hand: the outer product of a 3-tap and a 5-tap normalised Gaussian at sigma 0.8
    def taps(n):
        w = [math.exp(-(k - n // 2) ** 2 / (2 * sigma ** 2)) for k in range(n)]
        return torch.tensor([v / sum(w) for v in w])
    want = taps(3)[:, None] * taps(5)[None, :]
    torch.testing.assert_close(out[17:20, 20:25], want, rtol=1e-5, atol=1e-7)
    assert float(out.sum()) == pytest.approx(1.0, rel=1e-5)
    assert float(out[16].abs().max()) == 0.0 and float(out[:, 19].abs().max()) == 0.0  # nothing beyond the taps


@both
def test_blur_at_the_border_reflects(aug):
    # an impulse in the corner: reflect padding mirrors without repeating the edge, so the corner keeps the centre
    # tap squared plus nothing mirrored onto itself; the neighbour gets its tap twice (itself and its mirror)
    sigma = 1.0
    w = [math.exp(-k * k / (2 * sigma ** 2)) for k in (-1, 0, 1)]
    t = [v / sum(w) for v in w]
    img = torch.zeros(1, 3, 8, 8)
    img[..., 0, 0] = 1
    out = aug.gaussian_blur(img, torch.tensor([sigma]), (3, 3))[0, 0]
    assert float(out[0, 0]) == pytest.approx(t[1] * t[1], rel=1e-5)
    # pixel (0, 1) reads x=0 through its left tap; pixel (1, 0) reads y=0 through its upper tap
    assert float(out[0, 1]) == pytest.approx(t[1] * t[0], rel=1e-5)
    assert float(out[1, 1]) == pytest.approx(t[0] * t[0], rel=1e-5)


@both
def test_blur_sigma_per_image(aug):
    img = torch.zeros(3, 3, 9, 9)
    img[..., 4, 4] = 1
    sigmas = torch.tensor([0.3, 0.7, 1.1])
    out = aug.gaussian_blur(img, sigmas, (5, 5))
    for i, sigma in enumerate(sigmas.tolist()):
        w = [math.exp(-k * k / (2 * sigma ** 2)) for k in range(-2, 3)]
        assert float(out[i, 0, 4, 4]) == pytest.approx((w[2] / sum(w)) ** 2, rel=1e-5), i


@both
def test_jitter_of_a_batch_each_image_its_own_factors_and_order(aug):
    # one pixel (0.8, 0.4, 0.2) in three images; a factor or an order taken from the wrong image changes the result
    x = px(0.8, 0.4, 0.2).expand(3, 3, 1, 1).clone()
    factors = torch.tensor([[0.1, 0.75, 0.5, 0.0], [-0.25, 1.25, 1.0, 0.0], [0.0, 1.0, 1.0, 0.25]])
    order = torch.tensor([[BRIGHTNESS, CONTRAST, SATURATION, HUE], [CONTRAST, BRIGHTNESS, HUE, SATURATION],
                          [HUE, SATURATION, BRIGHTNESS, CONTRAST]])
    out = aug.color_jitter(x, factors, order)
    # image 0: + 0.1 -> (0.9, 0.5, 0.3); * 0.75 -> (0.675, 0.375, 0.225); S = 0.45 / 0.675 = 2/3 -> 1/3, H in sector
    # 0 with f = 0.15 / 0.45 = 1/3: (v, t, p) = (0.675, 0.675 (1 - 2/3 * 1/3), 0.675 (1 - 1/3)); hue + 0: unchanged
    close(out[0], 0.675, 0.525, 0.45)
    # image 1: * 1.25 first -> (1.0, 0.5, 0.25), then - 0.25 -> (0.75, 0.25, 0.0) (brightness first: (0.6875, ...))
    close(out[1], 0.75, 0.25, 0.0)
    # image 2: hue + 0.25 rad (test_hue_shifts_radians_and_wraps_like_kornia's value), the others identities
    close(out[2], 0.8, 0.5432396, 0.2)


@both
def test_blur_impulses_at_the_border_with_a_sigma_per_image(aug):
    # an impulse in the corner of three images, each its own sigma, a 3-row x 5-column kernel: reflect padding mirrors
    # without repeating the edge, so pixel (y, x) gets row tap |y| and column tap |x| once (replicate would add the
    # taps that fall outside the image onto the corner)
    img = torch.zeros(3, 3, 7, 9)
    img[..., 0, 0] = 1
    sigmas = [0.4, 0.8, 1.15]
    out = aug.gaussian_blur(img, torch.tensor(sigmas), (3, 5))
    for i, sigma in enumerate(sigmas):
        def taps(n):  # normalised taps at offsets 0, 1, 2, ... of an n-tap window
            w = [math.exp(-(k - n // 2) ** 2 / (2 * sigma ** 2)) for k in range(n)]
            return [v / sum(w) for v in w][n // 2:]
        rows, cols = taps(3), taps(5)
        want = torch.zeros(7, 9)
        for y, r in enumerate(rows):
            for x, c in enumerate(cols):
                want[y, x] = r * c
        for c in range(3):
            torch.testing.assert_close(out[i, c], want, rtol=1e-5, atol=1e-7, msg=f"image {i} channel {c}")
