"""DACS as a preset of the same trainers (dsp.template 'source', dsp.source_mix false, hard paste, no long-tail paste,
no MMD): its mixed target and pixel weights by hand, the work each switch skips (the template batch, the long-tail
draw and crops, the MMD and its projection's gradient), a step with no host sync, and short runs of synthetic_dacs
in both trainers. The fast-vs-reference equivalence of every ablation row is in test_method_equivalence.py.
"""

from __future__ import annotations

import dataclasses
import json

import torch
import torch.nn.functional as F
from helpers_capture import cuda_like_context, record_next_step
from helpers_step import CPU, DACS_DSP, B, H, W, buffers, make_cfg, row_inputs, to_device_choices

from dsp_fast import method, reference, train
from dsp_fast.config import FastConfig, load_config
from dsp_fast.data import IGNORE_LABEL
from dsp_fast.engine.data_setup import build_step_loader, prepare_synthetic
from dsp_fast.engine.distributed import DistInfo
from dsp_fast.engine.model_setup import build_models
from dsp_fast.engine.step import StepBuffers
from dsp_fast.engine.trainer import Trainer
from dsp_fast.models import PROJECTION_ROOT, build_model, normalize_input


def normalize(x: torch.Tensor) -> torch.Tensor:
    return normalize_input(x, "torchvision")


def test_dacs_mixes_the_source_onto_the_target_with_weight_one_on_m_and_q_elsewhere():
    """template 'source', lam 1: xt_mix = M*x_s + (1-M)*x_t, yt_mix = where(M, y_s, yhat_t), M the chosen classes of
    y_s, and L_tgtmix = mean(W * CE) with W = 1 on M, q elsewhere. The images exactly (a hard paste multiplies by
    exactly 1 and 0); the loss to 1e-6 relative (log-softmax gather against cross_entropy: summation order only)."""
    cfg = dataclasses.replace(make_cfg(**DACS_DSP), fast=FastConfig(batched_student=False))
    batch, choices = row_inputs(cfg, torch.Generator().manual_seed(1), jitter=False, blur=False)
    x_s, y_s, _, _, x_t = batch
    torch.manual_seed(0)
    student, teacher = build_model(cfg.model), build_model(cfg.model)
    with torch.no_grad():  # the threshold at the median confidence of the untrained teacher: 0 < q < 1
        conf = method.seg_forward(teacher, x_t, normalize)[0].softmax(dim=1).amax(dim=1)
    cfg = dataclasses.replace(cfg, dsp=dataclasses.replace(cfg.dsp, conf_threshold=float(conf.median())))
    mix = method.dsp_mix(cfg, teacher, normalize, *batch, to_device_choices(choices))

    ids = torch.where(y_s == IGNORE_LABEL, cfg.model.num_classes, y_s)
    m = torch.stack([choices.class_sel[i][ids[i]] for i in range(B)])
    assert 0 < int(m.sum()) < m.numel()  # not vacuous: both sides of M occur
    assert torch.equal(mix.mask, m) and torch.equal(mix.weight_mask, m)
    assert torch.equal(mix.xt_mix, torch.where(m[:, None], x_s, x_t))
    assert torch.equal(mix.yt_mix, torch.where(m, y_s, mix.yhat_t))
    _, _, ref_xt, ref_yt = reference.soft_paste(cfg, x_s, y_s, x_s, y_s, x_t, mix.yhat_t, m)  # the reference's too
    assert torch.equal(ref_xt, mix.xt_mix) and torch.equal(ref_yt, mix.yt_mix)

    losses = method.dsp_losses(cfg, student, teacher, normalize, *batch, to_device_choices(choices))
    assert set(losses) == {"loss", "src", "tgtmix", "q"}  # no source mix, no MMD
    logits = method.seg_forward(student, mix.xt_mix, normalize)[0]  # train-mode BN: the same batch statistics
    ce = F.cross_entropy(logits, mix.yt_mix, ignore_index=IGNORE_LABEL, reduction="none")
    q = float(mix.q)
    assert 0 < q < 1
    want = (torch.where(m, 1.0, q) * ce).mean()
    torch.testing.assert_close(losses["tgtmix"], want, rtol=1e-6, atol=0)


def test_no_long_tail_draw_without_long_tail_classes():
    """dsp.num_long_tail 0: the reference draws no long-tail class or crop (it needs no class index: the long-tail
    source is None) and its choice generator moves only by the class selection and the augmentation's draws."""
    cfg = make_cfg(num_long_tail=0)
    y = torch.randint(0, 6, (B, H, W), generator=torch.Generator().manual_seed(3))
    gen, alone = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    choices = reference.draw_choices(cfg, y, None, gen)
    assert choices.long_tail == [[] for _ in range(B)]
    reference.select_classes(y, cfg.model.num_classes, False, alone)
    reference.draw_step_aug(B, (H, W), 0.8, 0.25, 0.5, alone)
    assert torch.equal(gen.get_state(), alone.get_state())


def test_dacs_loader_reads_no_template_and_no_long_tail_crop(synthetic_root):
    """synthetic_dacs's loader: no tmpl_* entries, no long-tail stream or crop, and the same source and target crops
    as DSP's loader at the same step (only the template is dropped); the step's buffers alias x_m, y_m to x_s, y_s."""
    over = [f"data.synthetic_root={synthetic_root}"]
    dacs, dsp = load_config("synthetic_dacs", over), load_config("synthetic", over)
    dirs = prepare_synthetic(dsp)
    loaders = [build_step_loader(c, DistInfo(), dirs, 5, B, "torch") for c in (dacs, dsp)]
    try:
        got, want = (next(loader) for loader in loaders)
        assert loaders[0].long_tail is None and loaders[1].long_tail is not None
    finally:
        for loader in loaders:
            loader.close()
    assert "tmpl_img" not in got and "tmpl_label" not in got and got["lt_img"].shape[0] == 0
    assert got["lt_class"].shape == (0,) and want["lt_img"].shape[0] == B * dsp.dsp.num_long_tail
    for key in ("src_img", "src_label", "tgt_img"):
        assert torch.equal(got[key], want[key]), key
    buf = StepBuffers.like(got, dacs.model.num_classes, False, dacs.dsp.paste_ignore_label)
    buf.load_(got)
    assert buf.x_m is buf.x_s and buf.y_m is buf.y_s and torch.equal(buf.y_s, got["src_label"].long())


def test_mmd_weight_zero_freezes_the_projection(synthetic_root):
    """dsp.mmd_weight 0: the projection takes no gradient (it is frozen before DDP wraps the student, so DDP needs
    no find_unused_parameters); it stays in the student's state_dict, so checkpoints keep their layout. A step
    reads two batches (source, target) and logs no srcmix and no mmd."""
    cfg = load_config("synthetic_dacs", [f"data.synthetic_root={synthetic_root}", "data.crop_size=[32,32]"])
    trainer = Trainer(cfg, DistInfo(), prepare_synthetic(cfg), say=lambda _: None)
    try:
        proj = {n for n, _ in trainer.student.named_parameters() if n.startswith(PROJECTION_ROOT)}
        assert proj and all(not p.requires_grad for n, p in trainer.student.named_parameters() if n in proj)
        built = dict(build_models(cfg, CPU)[0].named_parameters())  # every other parameter as the model has it
        assert all(p.requires_grad == built[n].requires_grad for n, p in trainer.student.named_parameters()
                   if n not in proj)
        assert trainer.images_per_step == 2 * cfg.data.batch_size
        trainer.step()
        assert set(trainer.ctx.sums) == {"loss", "src", "tgtmix", "q"}
        assert proj <= set(trainer.state_dict()["student"])
    finally:
        trainer.close()


def test_dacs_step_issues_no_host_sync_and_runs_no_mmd(value_checks_off):
    """The DACS row in the CUDA path's settings (batched student over 2 groups, fused SGD, device lr): no host sync,
    the fused paste ran, the MMD's pooling did not, and fused SGD ran for the two groups with gradients only
    (backbone, classifier: the projection has none)."""
    cfg = make_cfg(**DACS_DSP)
    batch, choices = row_inputs(cfg, torch.Generator().manual_seed(1))
    ch = to_device_choices(choices)
    student, teacher = build_models(cfg, CPU)
    ctx = cuda_like_context(cfg, student, teacher, torch.float32, CPU)
    ctx.set_schedule_(3, 1e-3)
    rec = record_next_step(ctx, lambda: buffers(batch, ch))
    names = [op for op, _ in rec.ops]
    assert "dsp_fast::dual_soft_paste" in names and "dsp_fast::adjoint_map" not in names
    assert sum(op.startswith("aten::_fused_sgd_") for op in names) == 2


def _run_args(root: str, out: str) -> list[str]:
    return ["--config", "synthetic_dacs", f"data.synthetic_root={root}", f"train.out_dir={out}",
            "train.max_steps=3", "data.crop_size=[32,32]", "data.eval_size=[64,32]", "data.max_eval_images=2",
            "train.compare_source_only=false", "train.log_every=1"]


def _logged_terms(run_dir) -> list[set[str]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [set(m) for m in lines if "loss" in m]


def test_synthetic_dacs_trains_in_both_trainers(synthetic_root, tmp_path):
    """A 3-step run of the synthetic_dacs preset in the fast and the reference trainer: both finish, log src and
    tgtmix every step and never srcmix or mmd."""
    fast_out, ref_out = tmp_path / "fast", tmp_path / "ref"
    assert train.main([*_run_args(synthetic_root, str(fast_out)), "--image-every", "0", "--no-tensorboard"]) == 0
    assert reference.main(_run_args(synthetic_root, str(ref_out))) == 0
    for out in (fast_out, ref_out):
        metrics = sorted(out.rglob("metrics.jsonl"))
        assert metrics, out
        terms = _logged_terms(metrics[0].parent)
        assert len(terms) == 3 and all({"src", "tgtmix"} <= t and not t & {"srcmix", "mmd"} for t in terms), terms
