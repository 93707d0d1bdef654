"""The fast path's DSP math (dsp_fast.method, Triton kernels in the interpreter) against the reference step:
same weights, same batch, same random choices -> same losses and the same updated student and teacher.

Tolerance: fp32 everywhere; the two paths differ only in summation order (fused log-softmax gather vs
cross_entropy, the adjoint pool vs the upsampled mean), so 1e-5 relative on losses and 1e-6 absolute on weights
after one SGD step at lr 1e-2.
"""

import copy
import dataclasses

import pytest
import torch

from dsp_fast import method, reference
from dsp_fast.config import Config, DataConfig, DSPConfig, FastConfig, ModelConfig, OptimConfig
from dsp_fast.models import build_model, normalize_input, param_groups

B, H, W, K = 2, 32, 32, 19


def make_cfg(**dsp) -> Config:
    data = DataConfig(source_size=(W, H), target_size=(W, H), crop_size=(W, H), eval_size=(W, H), batch_size=B)
    return Config(data=data, model=ModelConfig(arch="tiny", num_classes=K), dsp=DSPConfig(**dsp),
                  optim=OptimConfig(lr=1e-2))


SCRIPT_DSP = {"long_tail_paste": "columns", "share_first_mask": True, "paste_ignore_label": True,
              "kornia_hsv_quirk": True, "drop_target_soft_term": True, "train_mmd_projection": False, "lam": 0.8}
"""Every dsp.* switch of the gta2cs_script preset at the script's value (tests/test_script_switches.py)."""

LT_PRESENT = 12  # a long-tail class already present in the template


def make_batch(gen):
    def labels():
        y = torch.randint(0, 6, (B, H, W), generator=gen)
        y[:, :3] = 255
        y[:, 10:14, 10:14] = LT_PRESENT
        return y

    x_s, x_m, x_t = (torch.rand(B, 3, H, W, generator=gen) for _ in range(3))
    return x_s, labels(), x_m, labels(), x_t


def make_choices(cfg, y_m, gen, jitter: bool = True, blur: bool = True):
    # half the present classes (rounded up), never LT_PRESENT: its template pixels must stay out of M while the
    # pixels pasted for it join M
    sel = torch.zeros(B, K + 1, dtype=torch.bool)
    for i in range(B):
        present = [c for c in torch.unique(y_m[i]).tolist() if c != 255]
        others = [c for c in present if c != LT_PRESENT]
        chosen = torch.tensor(others)[torch.randperm(len(others), generator=gen)[: (len(present) + 1) // 2]]
        sel[i, chosen] = True
    crops = []
    for b in range(B):  # each template image its own crops (other windows), the classes shared by the step
        per_image = []
        for cls in (LT_PRESENT, 18):
            lab = torch.full((H, W), 255)
            lab[5 + 3 * b:9 + 3 * b, 20 - 4 * b:30 - 4 * b] = cls
            lab[20:22, :] = 3  # other classes in the crop must not be pasted
            per_image.append((cls, torch.rand(3, H, W, generator=gen), lab))
        crops.append(per_image)
    aug_src, aug_tgt = reference.draw_step_aug(B, (H, W), 0.8, 0.25, 0.5, gen)
    for a in (aug_src, aug_tgt):  # the step's shared coins, forced so that both branches can be tested
        a.jitter[:], a.blur[:] = jitter, blur
    return reference.StepChoices(sel, crops, aug_src, aug_tgt)


def to_device_choices(ch: reference.StepChoices) -> method.DeviceChoices:
    sel = ch.class_sel[:, :K]
    class_u = torch.where(sel, 0.1, 0.9)  # the chosen classes rank first among the present ones

    def aug_tensor(a):
        keys = torch.zeros(a.order.shape).scatter_(1, a.order, torch.arange(4.0).expand(a.order.shape[0], 4))
        return torch.cat([a.jitter[:, None].float(), a.factors, a.blur[:, None].float(), a.sigma[:, None], keys], 1)

    return method.DeviceChoices(
        class_u=class_u,
        lt_img=torch.stack([img for crops in ch.long_tail for _, img, _ in crops]),
        lt_label=torch.stack([lab for crops in ch.long_tail for _, _, lab in crops]),
        lt_cls=torch.tensor([c for c, _, _ in ch.long_tail[0]]),
        aug_src=aug_tensor(ch.aug_src), aug_tgt=aug_tensor(ch.aug_tgt))


def assert_fast_math_matches_reference(cfg: Config, batch, choices: reference.StepChoices,
                                       device_choices: method.DeviceChoices) -> None:
    """The fast path's DSP math (method.dsp_losses, one SGD step, method.ema_update) against reference.train_step
    on the same weights, batch and choices: losses 1e-5 relative, weights 1e-6 absolute."""
    cfg = dataclasses.replace(cfg, fast=FastConfig(batched_student=False))  # three calls on a plain student
    torch.manual_seed(0)
    student = build_model(cfg.model)
    teacher = copy.deepcopy(student)
    fast_student, fast_teacher = copy.deepcopy(student), copy.deepcopy(teacher)

    def sgd(model):
        groups = param_groups(model, cfg.optim.lr, cfg.optim.head_lr_mult, cfg.dsp.train_mmd_projection)
        return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=0.9, weight_decay=5e-4)

    ref_losses = reference.train_step(cfg, student, teacher, sgd(student), 3, batch, choices)

    opt = sgd(fast_student)
    for g in opt.param_groups:
        g["lr"] = reference.poly_lr(cfg, 3) * g["lr_mult"]
    losses = method.dsp_losses(cfg, fast_student, fast_teacher,
                               lambda x: normalize_input(x, "torchvision"), *batch, device_choices)
    losses["loss"].backward()
    opt.step()
    method.ema_update(list(fast_teacher.parameters()), list(fast_student.parameters()), torch.tensor(3),
                      cfg.dsp.ema_max)

    assert set(losses) == set(ref_losses)
    for k, v in ref_losses.items():
        assert float(losses[k].detach()) == pytest.approx(v, rel=1e-5, abs=1e-7), k
    for a, b in zip(student.state_dict().items(), fast_student.state_dict().items()):
        torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-6, msg=a[0])
    for a, b in zip(teacher.parameters(), fast_teacher.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_select_classes_counts_and_uniformity():
    y = torch.tensor([[[0, 1, 2], [3, 4, 255]], [[5, 5, 5], [5, 5, 5]]])
    counts = torch.zeros(2, K)
    for _ in range(400):
        sel = method.select_classes(y, torch.rand(2, K))
        assert sel[0].sum() == 3 and sel[0, :5].sum() == 3 and sel[1].sum() == 1 and sel[1, 5]
        counts += sel
    assert (counts[0, :5] / 400 - 0.6).abs().max() < 0.1  # each of 5 classes chosen with probability 3/5


@pytest.mark.parametrize("dsp,coins", [({}, (True, True)), ({}, (False, False)),
                                       ({"drop_target_soft_term": True, "lam": 0.8}, (True, False)),
                                       ({"enabled": False}, (True, True))])
def test_fast_step_matches_reference(dsp, coins):
    cfg = make_cfg(**dsp)
    gen = torch.Generator().manual_seed(1)
    batch = make_batch(gen)
    choices = make_choices(cfg, batch[3], gen, *coins)
    assert_fast_math_matches_reference(cfg, batch, choices, to_device_choices(choices))
