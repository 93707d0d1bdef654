"""The operators of one fast DSP step, recorded on the `meta` device for the cost model (bench.cost_model).

The step's own code runs: dsp_fast.method.dsp_losses (the teacher's forward, class selection, long-tail paste, the
dual soft paste, the strong augmentations, the losses and the weighted MMD) and its backward, then the student's
forward + backward passes, the finite check, SGD with momentum and the EMA. The student is split out of
dsp_losses so that its passes can be recorded as the trainer runs them (three forwards of B images) or as the
batched student runs them (fast.batched_student, the trainer's default: one forward of 3B images whose batch norm
takes statistics per group of B, `batched=True`): inside dsp_losses the student is a stand-in that
returns outputs of the right shape and keeps its inputs; their gradients then drive the recorded backward.

Fast (bf16): autocast casts the convolution weights to bf16 at every forward (the CUDA graph disables its cache),
and the cast's backward converts the weight gradients back to fp32; `cast_once=True` casts once per step per model
(a bf16 copy kept by the optimizer / EMA). The soft paste is one kernel: its twin's operators are folded into one
launch that reads its inputs and writes its outputs once.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch import nn
from torch.func import functional_call

from bench.cost_model import Counter, Op
from bench.profile_step import wrapped_method_calls
from dsp_fast import method
from dsp_fast.config import DSPConfig, ModelConfig
from dsp_fast.engine.batchnorm import apply_group_bn
from dsp_fast.engine.trainer import loss_settings
from dsp_fast.kernels import force_twins, set_value_checks
from dsp_fast.method import AUG_COLS, DeviceChoices
from dsp_fast.models import build_model


class CastCall:
    """model(x) as autocast runs it on a GPU: the input and the convolutions' weights cast to `dtype` (a
    differentiable cast: its backward casts the gradient back), batch norm on its fp32 parameters."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, cast_once: bool = False) -> None:
        self.model, self.dtype, self.cast_once = model, dtype, cast_once
        self.logits_align_corners = model.logits_align_corners
        bn = {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        self.cast = [n for n, _ in model.named_parameters() if n.rpartition(".")[0] not in bn]
        self._weights: dict[str, torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.dtype == torch.float32:
            return self.model(x)
        if self._weights is None or not self.cast_once:
            params = dict(self.model.named_parameters())
            self._weights = {n: params[n].to(self.dtype) for n in self.cast}
        return functional_call(self.model, self._weights, (x.to(self.dtype),))


class StudentStandIn:
    """Takes the student's place inside dsp_losses: keeps each input, returns leaf outputs of the student's shapes
    (allocations only, nothing recorded) whose gradients the recorded student backward then consumes."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, fmt: torch.memory_format) -> None:
        self.logits_align_corners = model.logits_align_corners
        self.classes, self.dim, self.dtype, self.fmt = model.num_classes, model.c1.out_channels, dtype, fmt
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from dsp_fast.models.deeplabv2 import output_size

        h, w = output_size(*x.shape[-2:])
        out = tuple(torch.empty(x.shape[0], c, h, w, device=x.device, dtype=self.dtype, memory_format=self.fmt)
                    .requires_grad_() for c in (self.classes, self.dim))
        self.inputs.append(x.detach())
        self.outputs.append(out)
        return out


def dsp_parts(counter: Counter, paste_as_kernel: bool) -> contextlib.AbstractContextManager:
    """The step's calls into dsp_fast.kernels class as DSP ops (as profile_step's ranges); with paste_as_kernel the
    soft paste's operators fold into one launch that reads the call's inputs and writes its outputs once."""

    def ranged(name, fn):
        def call(*args, **kwargs):
            first, counter.part = len(counter.ops), "DSP ops"
            try:
                out = fn(*args, **kwargs)
            finally:
                counter.part = None
            if paste_as_kernel and name == "dual_soft_paste":
                ins = [t for t in args if isinstance(t, torch.Tensor)]
                moved = sum(float(t.numel() * t.element_size()) for t in list(ins) + list(out))
                del counter.ops[first:]
                counter.ops.append(Op("dual_soft_paste_kernel", "DSP ops", 0.0, moved))
            return out
        return call

    return wrapped_method_calls(("dual_soft_paste", "weighted_mmd"), ranged)


@contextlib.contextmanager
def meta_autocast() -> Iterator[None]:
    """torch.autocast has no `meta` device; the step only disables it on the device of its tensors (the losses and
    the MMD in fp32), which on meta is the CPU's switch: a no-op here."""
    real = torch.autocast

    class Autocast(real):
        def __init__(self, device_type: str, *args, **kwargs) -> None:
            super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)

    torch.autocast = Autocast
    try:
        yield
    finally:
        torch.autocast = real


def record_step(arch: str, crop: int, batch: int, fast: bool, batched: bool = False, cast_once: bool = False,
                num_classes: int = 19, cpu: bool = False, groups_in_place: bool = False) -> tuple[list[Op], int]:
    """Every operator of one DSP step (meta tensors), and the number of trained parameters. cpu: the fast trainer
    as it runs on a CPU (fp32, channels_last, the adjoint MMD from interpolation matrices, the soft paste's twin).
    groups_in_place (with batched): a per-group batch norm that writes each group's output into its slice (a plan
    row, not the trainer's): priced as one batch norm over the 3B images, with no concatenation."""
    dtype = torch.bfloat16 if fast and not cpu else torch.float32
    fmt = torch.channels_last if fast or cpu else torch.contiguous_format
    twins, paste_as_kernel = not (fast or cpu), fast and not cpu
    with torch.device("meta"):
        student, teacher = (build_model(ModelConfig(arch=arch, num_classes=num_classes)).train() for _ in range(2))
    student, teacher = (m.to(memory_format=fmt) for m in (student, teacher))
    params = [p for p in student.parameters() if p.requires_grad]
    if batched and not groups_in_place:  # the trainer's per-group BN: a split, B-image calls, a concatenation
        apply_group_bn(student, batch)
    # dsp_losses calls the stand-in once per pass (batched_student off); student_passes records them batched or not
    cfg = types.SimpleNamespace(dsp=DSPConfig(), model=types.SimpleNamespace(num_classes=num_classes),
                                data=types.SimpleNamespace(crop_size=(crop, crop)),
                                fast=types.SimpleNamespace(batched_student=False))
    settings = loss_settings(cfg)

    def img(n: int) -> torch.Tensor:
        return torch.empty(n, 3, crop, crop, device="meta", memory_format=fmt)

    def lab(n: int) -> torch.Tensor:
        return torch.empty(n, crop, crop, dtype=torch.int64, device="meta")

    lt = settings_long_tail()
    choices = DeviceChoices(torch.empty(batch, num_classes, device="meta"), img(batch * lt), lab(batch * lt),
                            torch.empty(lt, dtype=torch.int64, device="meta"),
                            torch.empty(batch, AUG_COLS, device="meta"), torch.empty(batch, AUG_COLS, device="meta"))
    stand_in = StudentStandIn(student, dtype, fmt)
    model = CastCall(student, dtype, cast_once)
    mean, std = torch.empty(1, 3, 1, 1, device="meta"), torch.empty(1, 3, 1, 1, device="meta")
    counter = Counter()
    set_value_checks(False)  # a label check reads values; meta tensors have none
    try:
        with counter, meta_autocast(), force_twins(twins), dsp_parts(counter, paste_as_kernel):
            losses = method.dsp_losses(settings, stand_in, CastCall(teacher, dtype, cast_once),
                                       lambda x: (x - mean) / std, img(batch), lab(batch), img(batch), lab(batch),
                                       img(batch), choices)
            counter.phase = "backward"
            losses["loss"].backward()
            student_passes(counter, model, stand_in, batched)
            update(counter, student, teacher, params, losses)
    finally:
        set_value_checks(True)
    return counter.ops, len(params)


def settings_long_tail() -> int:
    """Long-tail crops per image per step (dsp.num_long_tail)."""
    return DSPConfig().num_long_tail


def student_passes(counter: Counter, model: CastCall, stand_in: StudentStandIn, batched: bool) -> None:
    """The student's forward + backward on what dsp_losses fed it, with the gradients its losses gave back."""
    grads = [tuple(t.grad if t.grad is not None else torch.zeros_like(t) for t in out) for out in stand_in.outputs]
    runs = [(stand_in.inputs, grads)] if batched else [([x], [g]) for x, g in zip(stand_in.inputs, grads)]
    outs, outs_grads = [], []
    counter.phase = "forward"
    for xs, gs in runs:
        logits, feat = model(xs[0] if len(xs) == 1 else torch.cat(xs))
        outs += [logits, feat]
        outs_grads += [g[0] if len(gs) == 1 else torch.cat(g) for g in zip(*gs)]
    counter.phase = "backward"  # one backward, as the step's: gradients meet before a shared weight cast
    torch.autograd.backward(outs, outs_grads)


def update(counter: Counter, student: nn.Module, teacher: nn.Module, params: list[torch.Tensor],
           losses: dict[str, torch.Tensor]) -> None:
    """The finite check, SGD with momentum and weight decay (as foreach operators: the fused kernel moves the same
    bytes) and the EMA as dsp_fast.method.ema_update, under no_grad."""
    counter.phase = "update"
    with torch.no_grad():
        grads = [p.grad if p.grad is not None else torch.empty_like(p) for p in params]
        found = torch.zeros((), device="meta")
        torch._foreach_abs(grads)  # the non-finite check reads every gradient once (no meta kernel for the amp op)
        moms = [torch.empty_like(p) for p in params]
        torch._foreach_add_(grads, params, alpha=5e-4)  # weight decay
        torch._foreach_mul_(moms, 0.9)
        torch._foreach_add_(moms, grads)
        torch._foreach_add_(params, moms, alpha=-1e-3)
        step_t = torch.zeros((), dtype=torch.int64, device="meta")
        method.ema_update(list(teacher.parameters()), list(student.parameters()), step_t, 0.99, skip=found)
        for v in losses.values():  # the loss sums
            found.add_(torch.where(found == 0, v.detach().float(), 0.0))
