"""The DSP training step as a plain function over static buffers: `train_step(ctx, buf)`.

Nothing in it reads a device value on the host (except the foreach/apex fallback's skip), so a CUDA graph can capture
it: the batch and the random choices go into the same buffers in place, the lr and the step number live in device
tensors. A non-finite loss or gradient sets `found_inf` on the device: fused SGD and the EMA (weight times
1 - found_inf) then leave every weight as it was; the step is counted. Step numbers refer to docs/method.md.

Shapes: B batch, K classes, L long-tail crops, H x W crop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from dsp_fast.augment import AUG_COLS
from dsp_fast.config import Config
from dsp_fast.engine.batchnorm import check_group_bn
from dsp_fast.method import DeviceChoices, Ranks, batched_student, dsp_losses, ema_update


@dataclasses.dataclass
class StepBuffers:
    """The step's inputs, at fixed addresses: images float RGB 0..1 (B, 3, H, W), labels int64 (B, H, W). With
    dsp.template 'source' the loader has no template batch: x_m, y_m are x_s, y_s themselves."""

    x_s: torch.Tensor
    y_s: torch.Tensor
    x_m: torch.Tensor
    y_m: torch.Tensor
    x_t: torch.Tensor
    choices: DeviceChoices

    @classmethod
    def like(cls, batch: dict[str, torch.Tensor], num_classes: int, channels_last: bool,
             paste_ignore_label: bool = False) -> StepBuffers:
        """Buffers shaped after one loader batch (the loader's shapes are fixed for a run); paste_ignore_label: one
        more class rank column, the ignore label's (dsp.paste_ignore_label). A batch without a template (tmpl_img)
        gets x_m, y_m aliasing x_s, y_s."""
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        b, _, h, w = batch["src_img"].shape
        lt = batch["lt_class"].shape[0]  # long-tail classes per step; lt_img holds B * lt crops, image-major
        dev = batch["src_img"].device

        def img(n: int) -> torch.Tensor:
            return torch.zeros(n, 3, h, w, device=dev).contiguous(memory_format=fmt)

        def lab(n: int) -> torch.Tensor:
            return torch.zeros(n, h, w, dtype=torch.int64, device=dev)

        class_columns = num_classes + int(paste_ignore_label)
        choices = DeviceChoices(class_u=torch.zeros(b, class_columns, device=dev), lt_img=img(b * lt),
                                lt_label=lab(b * lt), lt_cls=torch.full((lt,), -1, dtype=torch.int64, device=dev),
                                aug_src=torch.zeros(b, AUG_COLS, device=dev),
                                aug_tgt=torch.zeros(b, AUG_COLS, device=dev))
        x_s, y_s = img(b), lab(b)
        x_m, y_m = (img(b), lab(b)) if "tmpl_img" in batch else (x_s, y_s)
        return cls(x_s, y_s, x_m, y_m, img(b), choices)

    def load_(self, batch: dict[str, torch.Tensor]) -> None:
        """Copy a loader batch (uint8 images and labels) in place; images / 255 as the reference's to_tensor."""
        pairs = ((self.x_s, "src_img"), (self.x_m, "tmpl_img"), (self.x_t, "tgt_img"), (self.choices.lt_img, "lt_img"))
        for dst, key in pairs:
            if key in batch:  # no tmpl_img with dsp.template 'source'
                dst.copy_(batch[key], non_blocking=True)
                dst.div_(255)
        self.y_s.copy_(batch["src_label"], non_blocking=True)
        if "tmpl_label" in batch:
            self.y_m.copy_(batch["tmpl_label"], non_blocking=True)
        self.choices.lt_label.copy_(batch["lt_label"], non_blocking=True)
        self.choices.lt_cls.copy_(batch["lt_class"], non_blocking=True)


@dataclasses.dataclass
class StepContext:
    """Everything `train_step` touches besides the buffers. Device tensors here keep fixed addresses."""

    cfg: Config  # the losses read it directly (method.dsp_losses)
    student: nn.Module  # the DDP wrapper when distributed: its forward and backward sync the gradients
    teacher: nn.Module
    optimizer: torch.optim.Optimizer
    normalize: Callable[[torch.Tensor], torch.Tensor]
    amp_dtype: torch.dtype
    scaler: torch.amp.GradScaler
    device_skip: bool  # the optimizer reads found_inf on the device (torch fused SGD)
    sync_flag: bool  # all-reduce found_inf so every rank skips the same steps
    autocast_cache: bool = True  # off under CUDA graph capture (a cached cast would outlive the capture)
    compiled_losses: Callable | None = None  # torch.compile(compute_losses) with fast.compile 'step'
    ranks: Ranks | None = None  # several ranks: the collectives of the global batch's step
    # made by __post_init__, on the teacher's device
    step_t: torch.Tensor = dataclasses.field(init=False)  # int64 0-d: the step number (EMA alpha)
    found_inf: torch.Tensor = dataclasses.field(init=False)  # float 0-d: 1 when this step is skipped
    sums: dict[str, torch.Tensor] = dataclasses.field(init=False)  # each entry of dsp_losses summed over good steps
    counts: torch.Tensor = dataclasses.field(init=False)  # [good steps, skipped steps, current skipped run]
    teacher_params: list[torch.Tensor] = dataclasses.field(init=False)
    student_params: list[torch.Tensor] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        if batched_student(self.cfg):
            check_group_bn(self.student)
        dev = next(self.teacher.parameters()).device
        self.step_t = torch.zeros((), dtype=torch.int64, device=dev)
        self.found_inf = torch.zeros((), device=dev)
        self.sums = {}  # filled by the first (eager) step with the keys dsp_losses returns
        self.counts = torch.zeros(3, device=dev)
        self.teacher_params = list(self.teacher.parameters())
        self.student_params = list(self.student.parameters())
        if self.device_skip and not self.scaler.is_enabled():  # fp16: the scaler hands fused SGD its own flag
            self.optimizer.found_inf = self.found_inf  # fused SGD skips its update where found_inf != 0

    def set_schedule_(self, step: int, lr: float) -> None:
        """Before the step, outside any graph: the step number and each group's lr (in place when a tensor)."""
        self.step_t.fill_(step)
        for g in self.optimizer.param_groups:
            if isinstance(g["lr"], torch.Tensor):
                g["lr"].fill_(lr * g["lr_mult"])
            else:
                g["lr"] = lr * g["lr_mult"]


def train_step(ctx: StepContext, buf: StepBuffers) -> None:
    """One DSP step (steps 1-7): losses, one backward, a finite check, SGD, EMA; the terms accumulate in ctx.sums."""
    ctx.optimizer.zero_grad(set_to_none=True)
    losses = (ctx.compiled_losses or compute_losses)(ctx, buf)
    ctx.scaler.scale(losses["loss"]).backward()
    apply_update(ctx, losses)


def compute_losses(ctx: StepContext, buf: StepBuffers) -> dict[str, torch.Tensor]:
    """Steps 1-6 under the run's autocast (the losses and the MMD turn it off inside: they stay fp32)."""
    with torch.autocast(buf.x_s.device.type, dtype=ctx.amp_dtype, enabled=ctx.amp_dtype != torch.float32,
                        cache_enabled=ctx.autocast_cache):
        return dsp_losses(ctx.cfg, ctx.student, ctx.teacher, ctx.normalize, buf.x_s, buf.y_s, buf.x_m, buf.y_m,
                          buf.x_t, buf.choices, ranks=ctx.ranks)


def apply_update(ctx: StepContext, losses: dict[str, torch.Tensor]) -> None:
    """After the backward: the finite check, the SGD step (skipped on the device when not finite), step 7's EMA and
    the loss sums."""
    found = _check_finite_(ctx, losses["loss"])
    if ctx.scaler.is_enabled():  # fp16: the scaler skips (and backs off) on overflowing gradients itself
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
    elif ctx.device_skip:
        ctx.optimizer.step()
    elif not bool(found):  # foreach / apex: one host read per step (their update cannot read a device flag)
        ctx.optimizer.step()
    ema_update(ctx.teacher_params, ctx.student_params, ctx.step_t, ctx.cfg.dsp.ema_max, skip=found)
    keep = found == 0
    for k, value in losses.items():
        if k not in ctx.sums:  # the first step, eager (a graph is captured later, over the same tensors)
            ctx.sums[k] = torch.zeros((), device=value.device)
        ctx.sums[k].add_(torch.where(keep, value.detach().float(), 0.0))
    ctx.counts[0].add_(1 - found)
    ctx.counts[1].add_(found)
    ctx.counts[2].add_(found).mul_(found)  # consecutive skipped steps: reset by any good step


def _check_finite_(ctx: StepContext, loss: torch.Tensor) -> torch.Tensor:
    """found_inf = 1 if the loss or any gradient is not finite (gradients after DDP's all-reduce, so ranks agree)."""
    ctx.found_inf.copy_(~torch.isfinite(loss.detach()))
    if not ctx.scaler.is_enabled():
        grads = [p.grad for g in ctx.optimizer.param_groups for p in g["params"] if p.grad is not None]
        # multiplying by exactly 1.0 leaves the gradients' bits unchanged; only the flag is wanted
        torch._amp_foreach_non_finite_check_and_unscale_(grads, ctx.found_inf, torch.ones_like(ctx.found_inf))
    if ctx.sync_flag:
        dist.all_reduce(ctx.found_inf, op=dist.ReduceOp.MAX)
    return ctx.found_inf


def read_stats(ctx: StepContext) -> tuple[dict[str, float], int, int]:
    """The terms' means over the good steps since the last read, the skipped steps since then, and the current run
    of consecutive skipped steps; then reset. One host sync (log steps only). With several ranks, the means over
    ranks: a rank's terms are its share of the global terms times world_size, so their mean is the global value."""
    values_t = torch.cat([torch.stack(list(ctx.sums.values())), ctx.counts])
    if ctx.sync_flag:
        dist.all_reduce(values_t)
        values_t = values_t / dist.get_world_size()  # the counts agree on every rank (found_inf is all-reduced)
    values = values_t.tolist()
    n = len(ctx.sums)
    good, skipped, run = values[n:]
    means = {k: v / good for k, v in zip(ctx.sums, values[:n])} if good else {}
    for t in ctx.sums.values():
        t.zero_()
    ctx.counts[:2].zero_()  # the consecutive run carries over
    return means, int(skipped), int(run)
