"""The reference DSP step against values computed by hand: soft paste, long-tail paste, losses, EMA, choices."""

import math

import pytest
import torch

from dsp_fast.augment import draw_strong_aug
from dsp_fast.config import Config, DataConfig, DSPConfig, ModelConfig
from dsp_fast.kernels.reference import mmd_rbf
from dsp_fast.reference import (
    StepChoices,
    dsp_losses,
    ema_alpha,
    ema_update,
    long_tail_crop,
    paste_long_tail,
    select_classes,
    soft_paste,
)


def small_cfg(**dsp) -> Config:
    data = DataConfig(source_size=(4, 4), target_size=(4, 4), crop_size=(4, 4), eval_size=(4, 4))
    return Config(data=data, model=ModelConfig(arch="tiny", num_classes=2),
                  dsp=DSPConfig(long_tail_classes=[1], num_long_tail=0, **dsp))


class ConstantModel(torch.nn.Module):
    """Predicts p = (1/4, 3/4) everywhere, whatever the input: every cross-entropy is known by hand."""

    input_kind = "torchvision"

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
    no_aug = draw_strong_aug(1, 4, jitter_p=0.0, strength=0.25, blur_p=0.0)
    return StepChoices(class_sel, list(long_tail), no_aug, no_aug)


def test_soft_paste_by_hand():
    cfg = small_cfg(lam=0.9)
    x_s, y_s, x_m, y_m, x_t = batch()
    yhat = torch.ones_like(y_s)
    sel = torch.tensor([[False, True, False]])  # class 1 chosen -> M = columns 0-1
    xs_mix, ys_mix, xt_mix, yt_mix, mask = soft_paste(cfg, x_s, y_s, x_m, y_m, x_t, yhat, sel)
    assert mask[0, :, :2].all() and not mask[0, :, 2:].any()
    # inside M: 0.9 * template + 0.1 * destination; outside: the destination untouched
    assert torch.allclose(xs_mix[..., :2], 0.9 * x_m[..., :2] + 0.1 * x_s[..., :2])
    assert torch.allclose(xt_mix[..., :2], 0.9 * x_m[..., :2] + 0.1 * x_t[..., :2])
    assert torch.equal(xs_mix[..., 2:], x_s[..., 2:]) and torch.equal(xt_mix[..., 2:], x_t[..., 2:])
    assert ys_mix[0, :, :2].eq(1).all() and torch.equal(ys_mix[..., 2:], y_s[..., 2:])
    assert torch.equal(yt_mix, torch.ones_like(yt_mix))


def test_ignore_label_and_first_mask_bug():
    x_s, y_s, x_m, y_m, x_t = (torch.cat([t, t]) for t in batch())
    y_m[0, 0] = 255
    y_m[1] = 0
    sel = torch.tensor([[False, True, True], [True, False, False]])  # column 2 = the ignore label
    _, ys_mix, *_, mask = soft_paste(small_cfg(), x_s, y_s, x_m, y_m, x_t, y_s, sel)
    assert mask[0, 0].all() and ys_mix[0, 0].eq(255).all()  # ignore pixels pasted only when their column is set
    assert mask[1].all()
    bug = small_cfg(share_first_mask=True)
    *_, mask_bug = soft_paste(bug, x_s, y_s, x_m, y_m, x_t, y_s, sel)
    assert torch.equal(mask_bug[1], mask[0])


def test_select_classes_half_rounded_up():
    y_m = torch.tensor([[[0, 1, 2], [3, 4, 255]], [[5, 5, 5], [5, 5, 5]]])
    gen = torch.Generator().manual_seed(0)
    sel = select_classes(y_m, num_classes=19, paste_ignore_label=False, gen=gen)
    assert sel.shape == (2, 20)
    assert sel[0].sum() == 3 and sel[0, [0, 1, 2, 3, 4]].sum() == 3 and not sel[0, 19]  # 5 classes -> 3
    assert sel[1].sum() == 1 and sel[1, 5]
    hits = sum(bool(select_classes(y_m, 19, True, gen)[0, 19]) for _ in range(200))
    assert 0 < hits < 200  # with the authors' behaviour the ignore label is one of 6 candidates


def test_long_tail_paste_joins_mask():
    x_s, y_s, x_m, y_m, x_t = batch()
    y_m[:] = 0
    lt_label = torch.full((4, 4), 255)
    lt_label[3, 3] = 1
    lt_img = torch.full((3, 4, 4), 0.5)
    sel = torch.tensor([[False, False, False]])
    x_m2, y_m2, sel2 = paste_long_tail(x_m, y_m, sel, [(1, lt_img, lt_label)])
    assert y_m2[0, 3, 3] == 1 and (y_m2 == 1).sum() == 1  # only the class's pixels, not the crop's ignore pixels
    assert torch.all(x_m2[0, :, 3, 3] == 0.5) and torch.equal(x_m2[0, :, :3], x_m[0, :, :3])
    assert sel2[0, 1] and not sel[0, 1]  # the input selection is not modified
    *_, mask = soft_paste(small_cfg(), x_s, y_s, x_m2, y_m2, x_t, y_s, sel2)
    assert mask.sum() == 1 and mask[0, 3, 3]


class OneImageSource:
    def __init__(self, label):
        self.label = label.numpy()

    def __getitem__(self, i):
        return (torch.zeros(*self.label.shape, 3, dtype=torch.uint8).numpy(), self.label)


@pytest.mark.parametrize("mode", ["around_class", "retry"])
def test_long_tail_crop_contains_class(mode):
    label = torch.zeros(40, 60, dtype=torch.long)
    label[37, 2] = 7  # one pixel near a corner
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        crop = long_tail_crop(OneImageSource(label), 0, 7, (60, 40), (16, 16), mode, gen)
        if crop is not None:  # 'retry' can give up, as the authors' loop does
            assert crop[0].shape == (3, 16, 16) and (crop[1] == 7).any()
    assert long_tail_crop(OneImageSource(label), 0, 7, (60, 40), (16, 16), "around_class", gen) is not None


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
