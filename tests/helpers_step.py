"""The small DSP step the equivalence tests share: a tiny-model config, a batch, the reference's random choices and
their device form, the fast step's context and buffers as the trainer builds them on CPU, and the comparisons of
the fast path against the reference step; the same for a small `mit_b0` (SegFormer encoder + DAFormer decoder).

Tolerances of the comparisons: fp32 everywhere; the fast path differs from the reference only in summation order
(fused log-softmax gather vs cross_entropy, the adjoint pool vs the upsampled mean, fused SGD), so 1e-5 relative on
losses and 1e-6 absolute on weights after one SGD step at lr 1e-2. channels_last changes the convolution kernels'
accumulation order too: 1e-4 relative on the losses, 1e-5 absolute on the weights (measured on CPU, torch 2.13:
NCHW 0 and 3e-8; channels_last 2e-7 and 5e-7).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from dsp_fast import method, reference
from dsp_fast.config import Config, DataConfig, DSPConfig, FastConfig, ModelConfig, OptimConfig
from dsp_fast.engine.batchnorm import apply_group_bn
from dsp_fast.engine.model_setup import apply_channels_last, build_models, make_normalize
from dsp_fast.engine.optimizer import build_grad_scaler, build_optimizer, scheduled_lr
from dsp_fast.engine.step import StepBuffers, StepContext, read_stats, train_step
from dsp_fast.method import DeviceChoices
from dsp_fast.models import build_model, normalize_input, param_groups

CPU = torch.device("cpu")
B, H, W, K = 2, 32, 32, 19


def make_cfg(**dsp) -> Config:
    data = DataConfig(source_size=(W, H), target_size=(W, H), crop_size=(W, H), eval_size=(W, H), batch_size=B)
    return Config(data=data, model=ModelConfig(arch="tiny", num_classes=K), dsp=DSPConfig(**dsp),
                  optim=OptimConfig(lr=1e-2))


SCRIPT_DSP = {"long_tail_paste": "columns", "share_first_mask": True, "paste_ignore_label": True,
              "kornia_hsv_quirk": True, "drop_target_soft_term": True, "train_mmd_projection": False, "lam": 0.8}
"""Every dsp.* switch of the gta2cs_script preset at the script's value (test_script_switches.py checks the preset
against it)."""

DACS_DSP = {"template": "source", "source_mix": False, "lam": 1.0, "num_long_tail": 0, "mmd_weight": 0.0}
"""DACS's switches (the gta2cs_dacs preset's, its paste_ignore_label aside)."""

ABLATION_ROWS = {
    "dacs": DACS_DSP,
    "+soft_paste": {**DACS_DSP, "lam": 0.9},
    "+dual": {"num_long_tail": 0, "mmd_weight": 0.0},
    "+long_tail": {"mmd_weight": 0.0},
    "+mmd (dsp)": {},
}
"""The ablation from DACS to DSP, one switch group added per row; the last row is DSP's defaults."""

LT_PRESENT = 12  # a long-tail class already present in the template


def make_batch(gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(x_s, y_s, x_m, y_m, x_t): random images, labels of classes 0-5 with an ignored band and LT_PRESENT."""
    def labels():
        y = torch.randint(0, 6, (B, H, W), generator=gen)
        y[:, :3] = 255
        y[:, 10:14, 10:14] = LT_PRESENT
        return y

    x_s, x_m, x_t = (torch.rand(B, 3, H, W, generator=gen) for _ in range(3))
    return x_s, labels(), x_m, labels(), x_t


def make_choices(cfg: Config, y_m: torch.Tensor, gen: torch.Generator, jitter: bool = True, blur: bool = True
                 ) -> reference.StepChoices:
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


def row_inputs(cfg: Config, gen: torch.Generator, jitter: bool = True, blur: bool = True
               ) -> tuple[tuple[torch.Tensor, ...], reference.StepChoices]:
    """make_batch and make_choices as a config reads them: with dsp.template 'source' the template is the source
    batch (x_m, y_m = x_s, y_s), with dsp.num_long_tail 0 no long-tail crops."""
    x_s, y_s, x_m, y_m, x_t = make_batch(gen)
    if cfg.dsp.template == "source":
        x_m, y_m = x_s, y_s
    choices = make_choices(cfg, y_m, gen, jitter, blur)
    choices.long_tail = [crops[:cfg.dsp.num_long_tail] for crops in choices.long_tail]
    return (x_s, y_s, x_m, y_m, x_t), choices


def to_device_choices(ch: reference.StepChoices) -> method.DeviceChoices:
    sel = ch.class_sel[:, :K]
    class_u = torch.where(sel, 0.1, 0.9)  # the chosen classes rank first among the present ones

    def aug_tensor(a):
        keys = torch.zeros(a.order.shape).scatter_(1, a.order, torch.arange(4.0).expand(a.order.shape[0], 4))
        return torch.cat([a.jitter[:, None].float(), a.factors, a.blur[:, None].float(), a.sigma[:, None], keys], 1)

    crops = [crop for per_image in ch.long_tail for crop in per_image]
    lt_img = torch.stack([img for _, img, _ in crops]) if crops else torch.zeros(0, 3, H, W)  # dsp.num_long_tail 0
    lt_label = torch.stack([lab for _, _, lab in crops]) if crops else torch.zeros(0, H, W, dtype=torch.int64)
    return method.DeviceChoices(
        class_u=class_u, lt_img=lt_img, lt_label=lt_label,
        lt_cls=torch.tensor([c for c, _, _ in ch.long_tail[0]], dtype=torch.int64),
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


def fast_context(cfg: Config, student: torch.nn.Module, teacher: torch.nn.Module, optimizer: str = "fused",
                 channels_last: bool = False, group_size: int | None = None) -> StepContext:
    """The step's context as the trainer builds it on CPU; with fast.batched_student (the default) the student's BN
    layers take statistics per group of `group_size` images (default: data.batch_size, one rank's batch)."""
    opts = FastConfig(amp="fp32", channels_last=channels_last, cuda_graphs=False, optimizer=optimizer)
    if cfg.fast.batched_student:
        apply_group_bn(student, group_size or cfg.data.batch_size)
    if channels_last:
        apply_channels_last(student, teacher)
    opt, device_skip = build_optimizer(cfg, student, opts, CPU)
    return StepContext(cfg, student, teacher, opt, make_normalize("torchvision", CPU), torch.float32,
                       build_grad_scaler(torch.float32, CPU), device_skip, sync_flag=False)


def buffers(batch: tuple[torch.Tensor, ...], choices: DeviceChoices, channels_last: bool = False) -> StepBuffers:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x_s, y_s, x_m, y_m, x_t = (t.clone() for t in batch)
    return StepBuffers(x_s.contiguous(memory_format=fmt), y_s, x_m.contiguous(memory_format=fmt), y_m,
                       x_t.contiguous(memory_format=fmt), choices)


def assert_same_losses(losses: dict, skipped: float, ref_losses: dict, channels_last: bool) -> tuple[float, float]:
    """The fast step's losses equal the reference step's; returns the (rel, atol) the weights are compared with
    (channels_last reorders the convolutions' sums: 10x wider)."""
    rel, atol = (1e-4, 1e-5) if channels_last else (1e-5, 1e-6)
    assert skipped == 0 and set(losses) == set(ref_losses)
    for k, v in ref_losses.items():
        assert losses[k] == pytest.approx(v, rel=rel, abs=1e-7), k
    return rel, atol


def assert_same_models(ref_student, ref_teacher, student, teacher, atol: float) -> None:
    """After one step: every student tensor (parameters and BN buffers) and every teacher parameter of the fast
    step equal the reference step's within atol."""
    for (name, a), b in zip(ref_student.state_dict().items(), student.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=atol, msg=name)
    for a, b in zip(ref_teacher.parameters(), teacher.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=atol)


def with_repeats(cfg: Config, on: bool) -> Config:
    """cfg with optim.script_param_repeats (the authors' repeated backbone updates) set to `on`."""
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, script_param_repeats=on))


def assert_fast_step_matches_reference(cfg: Config, batch, choices, device_choices: DeviceChoices,
                                       channels_last: bool = False) -> None:
    """The fast trainer's train_step (the engine's optimizer and buffers) against reference.train_step with the
    reference's own optimizer, on the same weights, batch and choices, at step 3: losses and updated models."""
    student, teacher = build_models(cfg, CPU)
    fast_student, fast_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    step = 3

    ref_opt = reference.build_optimizer(cfg, student)
    ref_losses = reference.train_step(cfg, student, teacher, ref_opt, step, batch, choices)

    ctx = fast_context(cfg, fast_student, fast_teacher, channels_last=channels_last)
    ctx.set_schedule_(step, scheduled_lr(cfg.optim, step, cfg.train.max_steps))
    train_step(ctx, buffers(batch, device_choices, channels_last))
    losses, skipped, _ = read_stats(ctx)

    _, atol = assert_same_losses(losses, skipped, ref_losses, channels_last)
    assert_same_models(student, teacher, fast_student, fast_teacher, atol)


# mit_b0 at 64x64: stage maps 16, 8, 4, 2 and 4 keys per attention after sequence reduction (at 32x32 every stage
# would see a single key, its softmax would be 1 and the queries would get no gradient: a vacuous test of attention)
MIT_S = 64


def mit_cfg(algorithm: str, **dsp) -> Config:
    """A small mit_b0 config with SGD ("sgd") or DAFormer's AdamW recipe ("adamw", warm-up of 10 steps)."""
    s = MIT_S
    data = DataConfig(source_size=(s, s), target_size=(s, s), crop_size=(s, s), eval_size=(s, s), batch_size=B)
    optim = OptimConfig(lr=1e-2) if algorithm == "sgd" else OptimConfig(
        algorithm="adamw", lr=1e-3, weight_decay=0.01, norm_decay_mult=0.0, poly_power=1.0, warmup_steps=10)
    return Config(data=data, model=ModelConfig(arch="mit_b0", num_classes=K, decoder_dim=32), dsp=DSPConfig(**dsp),
                  optim=optim)


def mit_batch(gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    s = MIT_S

    def labels():
        y = torch.randint(0, 6, (B, s, s), generator=gen)
        y[:, :5] = 255
        y[:, 20:28, 20:28] = 12  # a long-tail class present in the template
        return y

    x_s, x_m, x_t = (torch.rand(B, 3, s, s, generator=gen) for _ in range(3))
    return x_s, labels(), x_m, labels(), x_t


def mit_choices(y_m: torch.Tensor, gen: torch.Generator, jitter: bool = True, blur: bool = True
                ) -> reference.StepChoices:
    """The reference's choices for mit_batch: per template image its own crop of each of the step's two long-tail
    classes, and one jitter coin and one blur coin per step, shared by the mixed images."""
    s = MIT_S
    sel = reference.select_classes(y_m, K, paste_ignore_label=False, gen=gen)
    crops = []
    for b in range(B):
        per_image = []
        for cls in (15, 18):
            lab = torch.full((s, s), 255)
            lab[10 + 4 * b:18 + 4 * b, 40 - 6 * b:60 - 6 * b] = cls
            lab[40:44, :] = 3  # other classes in the crop must not be pasted
            per_image.append((cls, torch.rand(3, s, s, generator=gen), lab))
        crops.append(per_image)
    aug_src, aug_tgt = reference.draw_step_aug(B, (s, s), 0.8, 0.25, 0.5, gen)
    for a in (aug_src, aug_tgt):
        a.jitter[:], a.blur[:] = jitter, blur
    return reference.StepChoices(sel, crops, aug_src, aug_tgt)
