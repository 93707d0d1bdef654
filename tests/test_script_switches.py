"""The authors'-script switches of docs/method.md in both trainers: the long-tail column paste, the ignore label as a
pasteable class, image 0's shared mask and kornia 0.2.0's HSV quirk. Each against values worked out by hand, then
the fast path's DSP math against the reference step with the switches on (same tolerances as
test_method_equivalence: fp32, summation order only), and the fast step's operators with no host sync.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers_capture import cuda_like_context, record_next_step
from helpers_step import (
    CPU,
    LT_PRESENT,
    SCRIPT_DSP,
    B,
    K,
    assert_fast_math_matches_reference,
    assert_fast_step_matches_reference,
    buffers,
    make_batch,
    make_cfg,
    make_choices,
)
from helpers_step import to_device_choices as plain_device_choices

from dsp_fast import method, reference
from dsp_fast.config import Config, load_config
from dsp_fast.engine.model_setup import build_models
from dsp_fast.models import build_model, normalize_input


# ------------------------------------------------------------------------------------------- the column paste
def column_crop() -> tuple[torch.Tensor, torch.Tensor]:
    """A 4x5 long-tail crop of class 3 whose first row holds the class in columns 1 and 3; a class pixel at (2, 4)
    lies outside those columns; 7 and 255 elsewhere."""
    label = torch.tensor([[7, 3, 7, 3, 7],
                          [255, 7, 7, 3, 7],
                          [7, 7, 7, 7, 3],
                          [7, 255, 7, 7, 7]])
    return torch.full((3, 4, 5), 0.5), label


def expected_paste(columns: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_m, y_m, pasted) for a zero template of class 0, by hand."""
    x = torch.zeros(1, 3, 4, 5)
    y = torch.zeros(1, 4, 5, dtype=torch.long)
    pasted = torch.zeros(1, 4, 5, dtype=torch.bool)
    for r, c in ((0, 1), (0, 3), (1, 3), (2, 4)):  # the class's pixels join M in both modes
        pasted[0, r, c] = True
    if columns:  # whole columns 1 and 3, whatever the crop's label there (7, 255 included)
        x[0, :, :, [1, 3]] = 0.5
        y[0, :, 1] = torch.tensor([3, 7, 7, 255])
        y[0, :, 3] = torch.tensor([3, 3, 7, 7])
    else:
        x[0, :, pasted[0]] = 0.5
        y[pasted] = 3
    return x, y, pasted


@pytest.mark.parametrize("columns", [True, False])
def test_column_paste_by_hand_in_both_trainers(columns):
    img, label = column_crop()
    x_m, y_m = torch.zeros(1, 3, 4, 5), torch.zeros(1, 4, 5, dtype=torch.long)
    want = expected_paste(columns)
    got_ref = reference.paste_long_tail(x_m, y_m, [[(3, img, label)]], columns)
    got_fast = method.paste_long_tail(x_m, y_m, img[None], label[None], torch.tensor([3]), columns)
    for got in (got_ref, got_fast):
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def test_column_paste_keeps_m_to_the_chosen_and_the_class_pixels():
    # the template's own class 0 is chosen in step 2: M holds every template pixel of class 0 before the paste (the
    # script's MixMask is made before rand_mixer pastes), plus the crop's class pixels; pasted column pixels of
    # other classes (7, 255) are written but stay out of M
    img, label = column_crop()
    x_m, y_m = torch.zeros(1, 3, 4, 5), torch.zeros(1, 4, 5, dtype=torch.long)
    y_m[0, :, 4] = 5  # column 4: class 5, not chosen
    sel = torch.zeros(1, K + 1, dtype=torch.bool)
    sel[0, 0] = True
    _, _, pasted = method.paste_long_tail(x_m, y_m, img[None], label[None], torch.tensor([3]), True)
    mask, _, _ = method.script_masks(method.class_mask(y_m, sel), pasted, False)
    want = torch.ones(1, 4, 5, dtype=torch.bool)
    want[0, :, 4] = False
    want[0, 2, 4] = True  # the crop's class pixel outside the pasted columns
    assert torch.equal(mask, want)


# ------------------------------------------------------------------------------------------- masks and classes
@pytest.mark.parametrize("share", [False, True])
def test_fast_masks_equal_the_reference_masks(share):
    gen = torch.Generator().manual_seed(0)
    chosen = torch.rand(3, 6, 7, generator=gen) < 0.4
    pasted = torch.rand(3, 6, 7, generator=gen) < 0.2
    cfg = make_cfg(share_first_mask=share)
    for fast, ref in zip(method.script_masks(chosen, pasted, share), reference.step_masks(cfg, chosen, pasted)):
        assert torch.equal(fast, ref)


def test_fast_selection_can_choose_the_ignore_label():
    y = torch.tensor([[[0, 1, 2], [3, 255, 255]]])  # 4 classes and the ignore label: 5 candidates, 3 chosen
    hits = 0
    for _ in range(300):
        sel = method.select_classes(y, torch.rand(1, K + 1), K)
        assert sel.shape == (1, K + 1) and int(sel.sum()) == 3 and not sel[0, 4:K].any()
        hits += int(sel[0, K])
    assert 120 < hits < 240  # 3 of 5 candidates: the ignore label with probability 0.6 (3 sigma: +- 25)
    assert method.select_classes(y, torch.rand(1, K), K).shape == (1, K)  # K columns: the ignore label excluded


# ------------------------------------------------------------------------------------------- both trainers
def script_choices(cfg, y_m, gen, ignore_images=(0,)):
    """make_choices with (a) the crops' class in their first row, so that the column paste writes columns, and
    (b) with dsp.paste_ignore_label the ignore label chosen in `ignore_images`, and every image choosing half of its
    candidates rounded up, the ignore label counted among them (as method.select_classes ranks them)."""
    ch = make_choices(cfg, y_m, gen)
    for per_image in ch.long_tail:
        for cls, _, lab in per_image:
            lab[0, 2 + cls % 5:6 + cls % 5] = cls
    if cfg.dsp.paste_ignore_label:
        sel = torch.zeros_like(ch.class_sel)
        for i in range(B):
            present = [c for c in torch.unique(y_m[i]).tolist() if c != 255]
            others = [c for c in present if c != LT_PRESENT]
            want = (len(present) + 1 + 1) // 2  # the ignore label occurs in every template (make_batch's rows)
            take = want - (i in ignore_images)
            sel[i, others[:take]] = True
            sel[i, K] = i in ignore_images
        ch.class_sel = sel
    return ch


def device_choices(cfg, ch) -> method.DeviceChoices:
    dev = plain_device_choices(ch)
    if cfg.dsp.paste_ignore_label:
        dev.class_u = torch.where(ch.class_sel, 0.1, 0.9)  # K+1 columns: the chosen ones rank first
    return dev


@pytest.mark.parametrize("dsp", [SCRIPT_DSP, {"long_tail_paste": "columns"}, {"paste_ignore_label": True},
                                 {"share_first_mask": True}, {"kornia_hsv_quirk": True}])
def test_fast_math_matches_reference_with_script_switches(dsp):
    cfg = make_cfg(**dsp)
    gen = torch.Generator().manual_seed(1)
    batch = make_batch(gen)
    choices = script_choices(cfg, batch[3], gen)
    assert_fast_math_matches_reference(cfg, batch, choices, device_choices(cfg, choices))


def test_script_switches_change_the_step():
    """Not vacuous: with the script's switches the mixed images differ from the paper's (columns, quirk, mask)."""
    gen = torch.Generator().manual_seed(1)
    batch = make_batch(gen)
    outs = []
    for dsp in ({}, SCRIPT_DSP):
        cfg = make_cfg(**dsp)
        choices = script_choices(cfg, batch[3], torch.Generator().manual_seed(2))
        torch.manual_seed(0)
        teacher = build_model(cfg.model)
        outs.append(method.dsp_mix(cfg, teacher, lambda x: normalize_input(x, "torchvision"), *batch,
                                   device_choices(cfg, choices)))
    assert not torch.equal(outs[0].mask, outs[1].mask) and not torch.equal(outs[0].xs_mix, outs[1].xs_mix)


def gta2cs_script_cfg() -> Config:
    """The test's small tiny-model config with every switch of the gta2cs_script preset, read from the preset."""
    small, preset = make_cfg(), load_config("gta2cs_script")
    assert preset.optim.script_param_repeats and preset.model.aspp_two_branch_bug
    assert {k: getattr(preset.dsp, k) for k in SCRIPT_DSP} == SCRIPT_DSP
    return Config(data=small.data, model=dataclasses.replace(preset.model, arch="tiny", pretrained=""),
                  dsp=preset.dsp, optim=dataclasses.replace(preset.optim, lr=small.optim.lr), train=small.train)


def test_fast_train_step_matches_reference_with_gta2cs_script_switches():
    """The fast trainer's step (fused SGD repeated per multiplicity, the engine's buffers) against the reference's
    (torch 1.7.1's SGD loop over the script's listing): fp32, one step, losses and updated weights."""
    cfg = gta2cs_script_cfg()
    gen = torch.Generator().manual_seed(1)
    batch = make_batch(gen)
    choices = script_choices(cfg, batch[3], gen)
    assert_fast_step_matches_reference(cfg, batch, choices, device_choices(cfg, choices))


@pytest.mark.usefixtures("value_checks_off")
def test_step_with_script_switches_issues_no_host_sync():
    """The gta2cs_script switches, the repeated fused SGD included, in the CUDA path's settings."""
    cfg = gta2cs_script_cfg()
    gen = torch.Generator().manual_seed(1)
    batch = make_batch(gen)
    ch = device_choices(cfg, script_choices(cfg, batch[3], gen))
    student, teacher = build_models(cfg, CPU)
    ctx = cuda_like_context(cfg, student, teacher, torch.float32, CPU)
    ctx.set_schedule_(3, 1e-3)
    rec = record_next_step(ctx, lambda: buffers(batch, ch))
    assert "dsp_fast::dual_soft_paste" in {op for op, _ in rec.ops}



def test_fast_train_step_matches_reference_with_gta2cs_dacs_switches():
    """The gta2cs_dacs preset's dsp and optim sections (the source batch as template, hard paste, the ignore label
    pasteable, no source mix, no long-tail paste, no MMD, DACS's repeated SGD updates) on the tiny model: the fast
    trainer's step (batched student over 2 groups) against the reference's, fp32, losses and updated weights."""
    small, preset = make_cfg(), load_config("gta2cs_dacs")
    assert preset.dsp.template == "source" and preset.dsp.paste_ignore_label and preset.optim.script_param_repeats
    cfg = Config(data=small.data, model=dataclasses.replace(preset.model, arch="tiny", pretrained=""),
                 dsp=preset.dsp, optim=dataclasses.replace(preset.optim, lr=small.optim.lr), train=small.train)
    gen = torch.Generator().manual_seed(1)
    x_s, y_s, _, _, x_t = make_batch(gen)
    choices = script_choices(cfg, y_s, gen)
    choices.long_tail = [[] for _ in range(B)]  # dsp.num_long_tail 0
    assert_fast_step_matches_reference(cfg, (x_s, y_s, x_s, y_s, x_t), choices, device_choices(cfg, choices))
