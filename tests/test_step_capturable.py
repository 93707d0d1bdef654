"""The fast step can be captured in a CUDA graph, checked on a CPU: no host sync and no data-dependent shape in any
operator it issues (fp32 and bf16 autocast, fused kernels and their twins), the MMD in fp32 under autocast, and
the whole step on fake `cuda` tensors with no cuda/cpu mix. A GPU is rare here; these are what catch a GPU fault.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers_capture import OpRecorder, cuda_like_context, record_next_step
from helpers_step import (
    CPU,
    DACS_DSP,
    SCRIPT_DSP,
    H,
    W,
    buffers,
    make_batch,
    make_cfg,
    make_choices,
    mit_batch,
    mit_cfg,
    mit_choices,
    to_device_choices,
    with_repeats,
)
from torch._subclasses.fake_tensor import FakeTensorMode

from dsp_fast.augment import AUG_COLS
from dsp_fast.engine.fused_bn import convert_fused_bn
from dsp_fast.engine.model_setup import build_models
from dsp_fast.engine.step import StepBuffers, apply_update, compute_losses
from dsp_fast.kernels import force_twins
from dsp_fast.method import DeviceChoices, mmd_term

AMP = {"fp32": torch.float32, "bf16": torch.bfloat16}


def test_recorder_finds_syncs_and_data_dependent_shapes():
    """The recorder is not vacuous: it names the host read behind _foreach_lerp_'s tensor weight (the EMA fault it
    was written for), a boolean index and nonzero, with their lines; the device-weight EMA passes."""
    a, b, w = [torch.zeros(3)], [torch.ones(3)], torch.tensor(0.5)
    with OpRecorder() as rec:
        torch._foreach_lerp_(a, b, w)
        a[0][a[0] > 0.2] = 1.0
        a[0].nonzero()
    assert [f.op for f in rec.syncs] == ["aten::_local_scalar_dense", "aten::index_put_", "aten::nonzero"]
    assert all("test_step_capturable.py" in f.where for f in rec.syncs)
    with OpRecorder() as rec:
        d = torch._foreach_sub(b, a)
        torch._foreach_mul_(d, w)
        torch._foreach_add_(a, d)
    assert rec.syncs == []


@pytest.mark.parametrize("amp,twins,dsp,repeats", [("fp32", False, True, False), ("bf16", False, True, False),
                                                   ("fp32", True, True, False), ("bf16", True, True, False),
                                                   ("fp32", False, False, False), ("bf16", False, True, True)])
def test_train_step_issues_no_host_sync(amp, twins, dsp, repeats, value_checks_off):
    """Every operator of one train_step (after one eager step, as the graph is captured after warm-up), in the CUDA
    path's settings; the twins ("fused kernels off") too, so that the ablation changes the kernels alone; and with
    optim.script_param_repeats (one fused SGD call per group on each of its passes)."""
    cfg = with_repeats(make_cfg(enabled=dsp), repeats)
    gen = torch.Generator().manual_seed(1)
    batch = make_batch(gen)
    ch = to_device_choices(make_choices(cfg, batch[3], gen))
    student, teacher = build_models(cfg, CPU)
    ctx = cuda_like_context(cfg, student, teacher, AMP[amp], CPU)
    ctx.set_schedule_(3, 1e-3)
    with force_twins(twins):
        rec = record_next_step(ctx, lambda: buffers(batch, ch))
    names = {op for op, _ in rec.ops}
    assert ("dsp_fast::dual_soft_paste" in names) == (dsp and not twins)  # the fused operators did run
    # fused SGD ran (a CPU 0-d lr binds the float overload; test_whole_step_on_fake_cuda checks that a cuda lr
    # binds the tensor one)
    assert any(op.startswith("aten::_fused_sgd_") for op in names)
    # one call per group with gradients (source-only: no projection); with repeats the groups backbone_x1/_x3/_x4,
    # classifier, projection: 5 calls on pass 1, 2 on passes 2 and 3, 1 on pass 4
    assert sum(op.startswith("aten::_fused_sgd_") for op, _ in rec.ops) == (10 if repeats else 3 if dsp else 2)


@pytest.mark.parametrize("amp", ["fp32", "bf16"])
def test_fused_bn_step_issues_no_host_sync(amp, value_checks_off):
    """fast.fused_bn: the fused BN operators forward and backward (the Triton path, as on CUDA), the running
    statistics moved per group and the batch-count updates, with no host sync."""
    cfg = make_cfg()
    gen = torch.Generator().manual_seed(1)
    batch = make_batch(gen)
    ch = to_device_choices(make_choices(cfg, batch[3], gen))
    student, teacher = build_models(cfg, CPU)
    assert convert_fused_bn(student) and convert_fused_bn(teacher)
    ctx = cuda_like_context(cfg, student, teacher, AMP[amp], CPU)
    ctx.set_schedule_(3, 1e-3)
    rec = record_next_step(ctx, lambda: buffers(batch, ch))
    names = {op for op, _ in rec.ops}
    assert {"dsp_fast::bn_stats", "dsp_fast::bn_act_fwd", "dsp_fast::bn_act_bwd_reduce",
            "dsp_fast::bn_act_bwd_dx"} <= names
    assert not any("batch_norm" in op for op in names)  # every BN of the tiny model went through the kernels


@pytest.mark.parametrize("algorithm", ["adamw", "sgd"])
def test_mit_b0_step_issues_no_host_sync(algorithm, value_checks_off):
    """The same recording on the MiT backbone (SDPA attention, drop path, DAFormer decoder), bf16 autocast, with
    the DAFormer recipe's fused AdamW as well as SGD."""
    cfg = mit_cfg(algorithm)
    gen = torch.Generator().manual_seed(1)
    batch = mit_batch(gen)
    ch = to_device_choices(mit_choices(batch[3], gen))
    student, teacher = build_models(cfg, CPU)
    ctx = cuda_like_context(cfg, student, teacher, torch.bfloat16, CPU)
    ctx.set_schedule_(3, 1e-4)
    rec = record_next_step(ctx, lambda: buffers(batch, ch))
    names = {op for op, _ in rec.ops}
    assert any(op.startswith(f"aten::_fused_{'adamw' if algorithm == 'adamw' else 'sgd'}_") for op in names)


def test_mmd_stays_fp32_under_autocast():
    """The pooling matmul inside the weighted MMD would run in bf16 under autocast if only its inputs were cast:
    no operator of the MMD term returns bf16, and the value equals the one computed without autocast."""
    s = make_cfg().dsp
    gen = torch.Generator().manual_seed(0)
    feat_s, feat_t = (torch.randn(2, 8, 5, 7, generator=gen) for _ in range(2))
    mask = torch.rand(2, 33, 49, generator=gen) < 0.5
    plain = mmd_term(s, feat_s, feat_t, mask, (33, 49))
    with torch.autocast("cpu", dtype=torch.bfloat16), OpRecorder() as rec:
        under_autocast = mmd_term(s, feat_s.bfloat16(), feat_t.bfloat16(), mask, (33, 49))
    low = [op for op, dtypes in rec.ops if torch.bfloat16 in dtypes and "_to_copy" not in op]
    assert not low, f"bf16 operators inside the MMD: {low}"
    assert any(op in ("aten::bmm", "aten::mm") for op, _ in rec.ops)
    # inputs rounded to bf16 once (the features), then fp32: close to the fp32 value, not equal
    torch.testing.assert_close(under_autocast, mmd_term(s, feat_s.bfloat16().float(), feat_t.bfloat16().float(),
                                                        mask, (33, 49)), rtol=0, atol=0)
    assert under_autocast.dtype == torch.float32 and torch.isfinite(plain)


def _fused_sgd_meta(params, grads, momentum_buffer_list, *, weight_decay, momentum, lr, dampening, nesterov,
                    maximize, is_first_step, grad_scale=None, found_inf=None):
    tensors = [*params, *grads, *momentum_buffer_list, lr] + [t for t in (grad_scale, found_inf) if t is not None]
    if len({t.device for t in tensors}) != 1:
        raise RuntimeError(f"_fused_sgd_: tensors on several devices {sorted({str(t.device) for t in tensors})}")


def _basic_getitem(t: torch.Tensor, index):
    """Tensor indexing with ints, slices, None and ... through view operators (the indexing binding, like copy_'s,
    asks for a device guard first). Anything else is an error: the step should not need more."""
    index = index if isinstance(index, tuple) else (index,)
    if Ellipsis in index:
        i = index.index(Ellipsis)
        n_fill = t.dim() - sum(1 for x in index if x is not None and x is not Ellipsis)
        index = index[:i] + (slice(None),) * n_fill + index[i + 1:]
    dim = 0
    for x in index:
        if x is None:
            t = t.unsqueeze(dim)
            dim += 1
        elif isinstance(x, int):
            t = t.select(dim, x)
        elif isinstance(x, slice):
            start, stop, step = x.indices(t.shape[dim])
            t = torch.ops.aten.slice.Tensor(t, dim, start, stop, step)
            dim += 1
        else:
            raise TypeError(f"fake-cuda test: unsupported index {x!r}")
    return t


@pytest.fixture
def fake_cuda_support(monkeypatch):
    """What fake cuda tensors need on a torch built without CUDA, for one test only: a meta kernel for fused SGD
    with a tensor lr (torch has none; this one checks what the real kernel requires of its inputs, one device, and
    nothing else), and Tensor.copy_, ~ and basic indexing through operators (their Python bindings ask the CUDA runtime
    for a device guard before any dispatch; the operators do the same work, minus that guard)."""
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("_fused_sgd_.tensor_lr", _fused_sgd_meta, "Meta")
    monkeypatch.setattr(torch.Tensor, "copy_",
                        lambda self, src, non_blocking=False: torch.ops.aten.copy_.default(self, src, non_blocking))
    monkeypatch.setattr(torch.Tensor, "__getitem__", _basic_getitem)
    monkeypatch.setattr(torch.Tensor, "__invert__", lambda self: torch.bitwise_not(self))
    yield
    lib._destroy()


@contextlib.contextmanager
def cuda_autocast_allowed():
    """torch.autocast('cuda') turns itself off where no CUDA device exists; the fake step needs it on. Only
    autocast's own availability checks are told otherwise (torch.cuda.is_available stays False)."""
    common = torch.cuda.amp.common
    real = common.amp_definitely_not_available, torch.cuda.is_bf16_supported
    common.amp_definitely_not_available, torch.cuda.is_bf16_supported = (lambda: False), (lambda *a, **k: True)
    try:
        yield
    finally:
        common.amp_definitely_not_available, torch.cuda.is_bf16_supported = real


@pytest.mark.parametrize("amp,script,repeats,dacs,fused", [
    ("bf16", False, False, False, False), ("fp32", False, False, False, False), ("bf16", True, False, False, False),
    ("bf16", True, True, False, False), ("bf16", False, False, True, False), ("bf16", False, False, False, True)])
def test_whole_step_on_fake_cuda(amp, script, repeats, dacs, fused, value_checks_off, fake_cuda_support):
    """Student, teacher, losses (fused operators through their fake implementations), fused SGD with a device lr
    and the EMA, on fake `cuda` tensors: any cuda/cpu mix raises, and no operator takes tensors of two devices
    (a CPU scalar tensor beside cuda ones would be baked into a graph). torch built without CUDA cannot record
    autograd on cuda tensors (autograd asks the CUDA runtime for a stream), so the forward runs without grad and
    the update half gets fake gradients; the backward's operators mirror the forward's devices. script: with the
    authors'-script switches (column paste, shared mask, ignore label pasteable, HSV quirk); repeats: with
    optim.script_param_repeats as well (every pass of the repeated SGD binds the device-lr overload); dacs: DACS's
    switches (the source batch as template, two student groups, no long-tail crop, no MMD); fused: with
    fast.fused_bn's modules (their operators' fake implementations, the running statistics on the device)."""
    cfg = with_repeats(make_cfg(**(SCRIPT_DSP if script else DACS_DSP if dacs else {})), repeats)
    student, teacher = build_models(cfg, CPU)
    if fused:
        convert_fused_bn(student)
        convert_fused_bn(teacher)
    cuda = torch.device("cuda")
    with FakeTensorMode(allow_non_fake_inputs=True), OpRecorder() as rec:
        student.to_empty(device=cuda)
        teacher.to_empty(device=cuda)
        ctx = cuda_like_context(cfg, student, teacher, AMP[amp], cuda)
        ctx.set_schedule_(3, 1e-3)
        b = 2
        n_lt = cfg.dsp.num_long_tail  # one crop per template image and long-tail class
        choices = DeviceChoices(class_u=torch.zeros(b, cfg.model.num_classes + script, device=cuda),
                                lt_img=torch.zeros(b * n_lt, 3, H, W, device=cuda),
                                lt_label=torch.zeros(b * n_lt, H, W, dtype=torch.int64, device=cuda),
                                lt_cls=torch.zeros(n_lt, dtype=torch.int64, device=cuda),
                                aug_src=torch.zeros(b, AUG_COLS, device=cuda),
                                aug_tgt=torch.zeros(b, AUG_COLS, device=cuda))
        img = [torch.zeros(b, 3, H, W, device=cuda) for _ in range(3)]
        lab = [torch.zeros(b, H, W, dtype=torch.int64, device=cuda) for _ in range(2)]
        # dsp.template 'source': x_m, y_m alias x_s, y_s, as StepBuffers.like makes them
        buf = (StepBuffers(img[0], lab[0], img[0], lab[0], img[2], choices) if dacs else
               StepBuffers(img[0], lab[0], img[1], lab[1], img[2], choices))
        with torch.no_grad(), cuda_autocast_allowed():
            losses = compute_losses(ctx, buf)
        for p in ctx.student_params:
            p.grad = torch.zeros_like(p)
        apply_update(ctx, losses)
    assert {t.device.type for t in [*losses.values(), *ctx.sums.values(), *ctx.teacher_params]} == {"cuda"}
    names = [op for op, _ in rec.ops]
    assert "dsp_fast::dual_soft_paste" in names and ("dsp_fast::adjoint_map" in names) != dacs  # no MMD in DACS
    assert ("dsp_fast::bn_act_fwd" in names) == fused
    # one call per group: with repeats backbone_x1/_x3/_x4 and the head groups on pass 1, _x3/_x4 on passes 2
    # and 3, _x4 on pass 4 (the script switches leave the projection out of the optimizer)
    head_groups = 1 + cfg.dsp.train_mmd_projection
    assert names.count("aten::_fused_sgd_.tensor_lr") == (3 + head_groups + 5 if repeats else 1 + head_groups)
    if amp == "bf16":  # autocast really ran: the convolutions returned bf16
        assert any(op == "aten::convolution" and torch.bfloat16 in dt for op, dt in rec.ops)
    assert not rec.mixes, "operators with tensors on two devices:\n" + "\n".join(map(str, rec.mixes))
    assert not rec.syncs, "\n".join(map(str, rec.syncs))
