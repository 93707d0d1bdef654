"""The reference DSP step against values computed by hand: soft paste, long-tail paste, losses, EMA, choices."""

import math

import numpy as np
import pytest
import torch

from dsp_fast.config import Config, DataConfig, DSPConfig, ModelConfig
from dsp_fast.kernels.twins import mmd_rbf
from dsp_fast.reference import (
    LongTailSource,
    StepChoices,
    class_mask,
    draw_step_aug,
    draw_strong_aug,
    dsp_losses,
    ema_alpha,
    ema_update,
    paste_long_tail,
    select_classes,
    soft_paste,
    source_loss,
    step_masks,
)


def small_cfg(**dsp) -> Config:
    data = DataConfig(source_size=(4, 4), target_size=(4, 4), crop_size=(4, 4), eval_size=(4, 4))
    return Config(data=data, model=ModelConfig(arch="tiny", num_classes=2),
                  dsp=DSPConfig(long_tail_classes=[1], num_long_tail=0, **dsp))


class ConstantModel(torch.nn.Module):
    """Predicts p = (1/4, 3/4) everywhere, whatever the input: every cross-entropy is known by hand."""

    input_kind = "torchvision"
    logits_align_corners = True  # full-size logits: the resize to the input size is the identity either way

    def __init__(self):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor([0.0, math.log(3.0)]))

    def forward(self, x):
        b, _, h, w = x.shape
        feat = x[:, :2, ::2, ::2] * 10  # varied features, so the MMD bandwidth is not zero
        return self.logits.view(1, 2, 1, 1).expand(b, 2, h, w), feat


A, B = math.log(4.0), -math.log(0.75)  # CE of label 0 and of label 1 under p = (1/4, 3/4)


def batch():
    """y_s: top row ignored, rest class 0. y_m: columns 0-1 class 1, columns 2-3 class 0."""
    y_s = torch.zeros(1, 4, 4, dtype=torch.long)
    y_s[:, 0] = 255
    y_m = torch.zeros(1, 4, 4, dtype=torch.long)
    y_m[:, :, :2] = 1
    x_s, x_m, x_t = (torch.rand(1, 3, 4, 4) for _ in range(3))
    return x_s, y_s, x_m, y_m, x_t


def choices_for(class_sel, long_tail=()):
    no_aug = draw_strong_aug(1, (4, 4), jitter=False, blur=False, strength=0.25)
    return StepChoices(class_sel, [list(long_tail)], no_aug, no_aug)


def test_soft_paste_by_hand():
    cfg = small_cfg(lam=0.9)
    x_s, y_s, x_m, y_m, x_t = batch()
    yhat = torch.ones_like(y_s)
    sel = torch.tensor([[False, True, False]])  # class 1 chosen -> M = columns 0-1
    mask = class_mask(y_m, sel)
    xs_mix, ys_mix, xt_mix, yt_mix = soft_paste(cfg, x_s, y_s, x_m, y_m, x_t, yhat, mask)
    assert mask[0, :, :2].all() and not mask[0, :, 2:].any()
    # inside M: 0.9 * template + 0.1 * destination; outside: the destination untouched
    assert torch.allclose(xs_mix[..., :2], 0.9 * x_m[..., :2] + 0.1 * x_s[..., :2])
    assert torch.allclose(xt_mix[..., :2], 0.9 * x_m[..., :2] + 0.1 * x_t[..., :2])
    assert torch.equal(xs_mix[..., 2:], x_s[..., 2:]) and torch.equal(xt_mix[..., 2:], x_t[..., 2:])
    assert ys_mix[0, :, :2].eq(1).all() and torch.equal(ys_mix[..., 2:], y_s[..., 2:])
    assert torch.equal(yt_mix, torch.ones_like(yt_mix))


def test_ignore_label_column():
    y_m = torch.zeros(2, 4, 4, dtype=torch.long)
    y_m[0, 0] = 255
    sel = torch.tensor([[False, True, True], [True, False, False]])  # column 2 = the ignore label
    mask = class_mask(y_m, sel)
    assert mask[0, 0].all() and not mask[0, 1:].any()  # ignore pixels in M only when their column is set
    assert mask[1].all()


def test_first_mask_bug_reproduces_the_script():
    # image 0 chose the left column, image 1 the right one; each image's long-tail paste wrote one pixel
    chosen = torch.zeros(2, 4, 4, dtype=torch.bool)
    chosen[0, :, 0] = True
    chosen[1, :, 3] = True
    pasted = torch.zeros(2, 4, 4, dtype=torch.bool)
    pasted[0, 0, 2] = True
    pasted[1, 3, 1] = True
    mix, weight, mmd = step_masks(small_cfg(), chosen, pasted)
    assert torch.equal(mix, chosen | pasted) and torch.equal(weight, mix) and torch.equal(mmd, mix)
    mix, weight, mmd = step_masks(small_cfg(share_first_mask=True), chosen, pasted)
    # the script: image 0 mixed with MixMask0 after its own paste; image 1 with MixMask0 after both pastes
    want0 = chosen[0].clone()
    want0[0, 2] = True
    want1 = want0.clone()
    want1[3, 1] = True
    assert torch.equal(mix[0], want0) and torch.equal(mix[1], want1)
    # W: image 0 from MixMask0 at the end, image 1 from its own MixMask1 (its chosen classes, no pasted pixel)
    assert torch.equal(weight[0], want1) and torch.equal(weight[1], chosen[1])
    # the masked MMD multiplies both images by MixMask0 at the end
    assert torch.equal(mmd[0], want1) and torch.equal(mmd[1], want1)


def test_select_classes_half_rounded_up():
    y_m = torch.tensor([[[0, 1, 2], [3, 4, 255]], [[5, 5, 5], [5, 5, 5]]])
    gen = torch.Generator().manual_seed(0)
    sel = select_classes(y_m, num_classes=19, paste_ignore_label=False, gen=gen)
    assert sel.shape == (2, 20)
    assert sel[0].sum() == 3 and sel[0, [0, 1, 2, 3, 4]].sum() == 3 and not sel[0, 19]  # 5 classes -> 3
    assert sel[1].sum() == 1 and sel[1, 5]
    hits = sum(bool(select_classes(y_m, 19, True, gen)[0, 19]) for _ in range(200))
    assert 0 < hits < 200  # with the authors' behaviour the ignore label is one of 6 candidates


def test_only_pasted_long_tail_pixels_join_the_mask():
    x_s, y_s, x_m, y_m, x_t = batch()
    y_m[:] = 0
    y_m[0, 0, 0] = 1  # class 1 already in the template, not chosen
    lt_label = torch.full((4, 4), 255)
    lt_label[3, 3] = 1
    lt_img = torch.full((3, 4, 4), 0.5)
    sel = torch.tensor([[False, False, False]])
    chosen = class_mask(y_m, sel)
    x_m2, y_m2, pasted = paste_long_tail(x_m, y_m, [[(1, lt_img, lt_label)]])
    assert y_m2[0, 3, 3] == 1 and (y_m2 == 1).sum() == 2  # only the class's pixels, not the crop's ignore pixels
    assert torch.all(x_m2[0, :, 3, 3] == 0.5) and torch.equal(x_m2[0, :, :3], x_m[0, :, :3])
    assert y_m[0, 3, 3] == 0  # the input is not modified
    mask, *_ = step_masks(small_cfg(), chosen, pasted)
    assert mask.sum() == 1 and mask[0, 3, 3]  # the pasted pixel, not the template's own class-1 pixel


class LabelSource:
    """A source dataset of given labels (black images), with the reader interface LongTailSource uses."""

    def __init__(self, labels):
        self.labels = [np.asarray(lb, dtype=np.int64) for lb in labels]

    def read_label(self, i):
        return self.labels[i]

    def __getitem__(self, i):
        return np.zeros((*self.labels[i].shape, 3), dtype=np.uint8), self.labels[i]


@pytest.mark.parametrize("mode", ["counts", "retry"])
def test_long_tail_crop_contains_class(mode):
    label = np.zeros((40, 60), dtype=np.int64)
    label[37, 2] = 7  # one pixel near a corner
    source = LongTailSource(LabelSource([label]), [[0] if c == 7 else [] for c in range(8)], (60, 40), (16, 16))
    gen = torch.Generator().manual_seed(0)
    drawn = 0
    for _ in range(20):
        crop = source.draw(7, mode, gen)
        if crop is not None:  # 'retry' can give up, as the authors' loop does
            drawn += 1
            assert crop[0].shape == (3, 16, 16) and (crop[1] == 7).any()
    # 'counts' never gives up; 'retry' gave at least one crop, so the check above ran in both modes
    assert drawn == 20 if mode == "counts" else drawn >= 1


def exact_window_distribution(labels, cls, crop):
    """P(image, window) of the retry loop conditional on success, by brute force: uniform over the valid pairs."""
    cw, ch = crop
    cells = {}
    for i, lb in enumerate(labels):
        h, w = lb.shape
        for y0 in range(h - ch + 1):
            for x0 in range(w - cw + 1):
                if (lb[y0:y0 + ch, x0:x0 + cw] == cls).any():
                    cells[(i, y0, x0)] = 1.0
    return {k: v / len(cells) for k, v in cells.items()}


def test_counts_sampler_matches_the_retry_loop():
    # three images of different valid-window counts (one class pixel, a blob, a stripe): crops 4x4 of 9x7 images
    labels = [np.zeros((7, 9), dtype=np.int64) for _ in range(3)]
    labels[0][0, 0] = 1
    labels[1][3:5, 4:6] = 1
    labels[2][:, 8] = 1
    index = [[], [0, 1, 2]]
    want = exact_window_distribution(labels, 1, (4, 4))
    n = 3000
    for mode in ("counts", "retry"):
        source = LongTailSource(LabelSource(labels), index, (9, 7), (4, 4))
        gen = torch.Generator().manual_seed(1)
        got: dict = {}
        for _ in range(n):
            img, lab = source.draw(1, mode, gen)
            # recover (image, window) from the crop: labels differ per image, the window is where it matches
            hits = [(i, y0, x0) for (i, y0, x0) in want
                    if np.array_equal(labels[i][y0:y0 + 4, x0:x0 + 4], lab.numpy())]
            for key in hits:
                got[key] = got.get(key, 0) + 1 / len(hits)
        assert set(got) <= set(want)
        # total variation over the 25 valid (image, window) cells, n = 3000 draws: a correct sampler's expected TV
        # is 0.5 * 25 * sqrt(p(1-p)/n) * sqrt(2/pi) = 0.036 at p = 1/25 (measured 0.021-0.040 over seeds);
        # drawing the image uniformly instead of by its count would give 0.47
        tv = 0.5 * sum(abs(got.get(k, 0) / n - p) for k, p in want.items())
        assert tv < 0.07, (mode, tv)


@pytest.mark.parametrize("drop, threshold", [(False, 0.968), (True, 0.968), (False, 0.5)])
def test_losses_by_hand(drop, threshold):
    lam = 0.9
    cfg = small_cfg(lam=lam, drop_target_soft_term=drop, conf_threshold=threshold)
    model = ConstantModel()
    out = dsp_losses(cfg, model, model, *batch(), choices_for(torch.tensor([[False, True, False]])))
    # teacher confidence 3/4: q = 0 under 0.968 (W = 1 on M's 8 pixels, 0 elsewhere), q = 1 under 0.5
    q = 1.0 if threshold < 0.75 else 0.0
    assert float(out["q"].detach()) == q
    assert float(out["src"].detach()) == pytest.approx(A)  # 12 valid pixels, all class 0
    # ys_mix: 8 pasted pixels of class 1, 6 of class 0, 2 ignored; y_s: 12 of class 0
    assert float(out["srcmix"].detach()) == pytest.approx((lam * (8 * B + 6 * A) + (1 - lam) * 12 * A) / 16)
    # yt_mix = yhat = 1 everywhere; weights 1 on the 8 pixels of M, q on the other 8
    per_pixel = lam * B + (0 if drop else (1 - lam) * B)
    assert float(out["tgtmix"].detach()) == pytest.approx((8 + 8 * q) * per_pixel / 16)
    total = out["src"] + out["srcmix"] + out["tgtmix"] + out["mmd"]
    assert float(out["loss"].detach()) == pytest.approx(float(total.detach()))


def test_source_only_is_plain_ce():
    cfg = small_cfg(enabled=False)
    out = dsp_losses(cfg, ConstantModel(), ConstantModel(), *batch(), choices_for(torch.zeros(1, 3, dtype=bool)))
    assert set(out) == {"loss", "src"} and float(out["loss"].detach()) == pytest.approx(A)


def test_mmd_by_hand():
    # two 1-d points 0 and 1: d2 = 1 off the diagonal, beta = 1, bandwidths 1/4 .. 4
    kxy = sum(math.exp(-1 / bw) for bw in (0.25, 0.5, 1, 2, 4))
    assert float(mmd_rbf(torch.tensor([[0.0]]), torch.tensor([[1.0]]))) == pytest.approx(5 + 5 - 2 * kxy)


def test_ema():
    assert ema_alpha(0, 0.99) == 0.0 and ema_alpha(1, 0.99) == 0.5 and ema_alpha(10_000, 0.99) == 0.99
    student, teacher = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        student.weight.fill_(1.0)
        teacher.weight.fill_(3.0)
    ema_update(teacher, student, alpha=0.75)
    assert torch.allclose(teacher.weight, torch.full((1, 2), 0.75 * 3 + 0.25 * 1))


def test_source_loss_is_zero_without_valid_pixels():
    from dsp_fast.method import source_ce

    logits = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1).expand(1, 2, 2, 2).clone().requires_grad_()
    labels = torch.tensor([[[0, 0], [1, 255]]])
    for fn in (source_loss, source_ce):
        assert float(fn(logits, labels).detach()) == pytest.approx((2 * A + B) / 3)  # mean over the 3 valid pixels
        none = fn(logits, torch.full((1, 2, 2), 255))
        none.backward()  # as the authors' CrossEntropy2d: 0, not NaN, and a step that still runs
        assert float(none.detach()) == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
        logits.grad = None


@pytest.mark.parametrize("mean_over,want", [("valid", (2 * A + B) / 3), ("all", (2 * A + B) / 4)])
def test_source_loss_mean_over_valid_or_all_pixels(mean_over, want):
    """dsp.source_ce_mean in both trainers: 'valid' (DSP's CrossEntropy2d) over the 3 labelled pixels, 'all'
    (DAFormer's decode head) over all 4, the ignored one counting 0."""
    from dsp_fast.method import source_loss as fast_source_loss

    logits = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1).expand(1, 2, 2, 2).clone()
    labels = torch.tensor([[[0, 0], [1, 255]]])
    assert float(source_loss(logits, labels, mean_over)) == pytest.approx(want)
    assert float(fast_source_loss(logits, labels, DSPConfig(source_ce_mean=mean_over))) == pytest.approx(want)


def test_reference_draws_its_augmentation_as_the_script():
    """The reference's own drawing (dsp_fast.reference.strong_aug): one jitter and one blur coin per step shared by
    both mixed batches, per-image factors in their ranges, a permutation per image, sigma in U(0.15, 1.15). The
    coins over 1000 steps: frequencies 0.8 and 0.5 (3 sigma: 0.04 and 0.05)."""
    gen = torch.Generator().manual_seed(0)
    jit, blur = [], []
    for _ in range(1000):
        src, tgt = draw_step_aug(2, (16, 16), 0.8, 0.25, 0.5, gen)
        coins = torch.stack([src.jitter, tgt.jitter, src.blur, tgt.blur])
        assert (coins[:2] == coins[0, 0]).all() and (coins[2:] == coins[2, 0]).all()  # one of each per step
        jit.append(bool(src.jitter[0]))
        blur.append(bool(src.blur[0]))
        for a in (src, tgt):
            assert sorted(a.order[0].tolist()) == [0, 1, 2, 3]
    assert abs(sum(jit) / 1000 - 0.8) < 0.04 and abs(sum(blur) / 1000 - 0.5) < 0.05
    f = draw_strong_aug(1000, (37, 45), True, True, 0.25, torch.Generator().manual_seed(0))
    assert f.factors.dtype == torch.float32 and f.order.dtype == torch.int64 and f.jitter.dtype == torch.bool
    assert f.factors[:, 0].abs().max() <= 0.25 and f.factors[:, 3].abs().max() <= 0.25  # offsets, in radians
    assert f.factors[:, 1:3].min() >= 0.75 and f.factors[:, 1:3].max() <= 1.25
    assert f.sigma.min() >= 0.15 and f.sigma.max() <= 1.15
    assert (f.order.sort(dim=1).values == torch.arange(4)).all() and len(torch.unique(f.order, dim=0)) == 24
    assert f.kernel_size == (3, 5)  # rows from the height (ceil 3.7 = 4 -> 3), columns from the width (5)
