"""The steps behind `python -m bench.memory`: the reference trainer's step on fake tensors (its own `train_step`,
dsp_fast/reference/step.py), and the check of both trainers' predictions against the same steps on real CPU
tensors. The fast trainer's prediction is dsp_fast.engine.memory_model's (the trainer prints it on CUDA).

The reference runs fp32, NCHW and eager, as on CUDA, its optimizer with torch's CUDA default (foreach; CPU tensors
would take the for loop), with every long-tail crop found and both coins of the strong augmentation up (the step's
largest case). It reads values on the host (the count of valid source pixels, the returned floats) and selects
pixels by boolean masks (its HSV sectors): on fake tensors a read answers 1, which keeps the ordinary branch, and a
mask selects every pixel (`HostReads`). Its host-side draws (real CPU tensors, as in a real run) stay real.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch._C._profiler import _EventType
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils.weak import WeakIdKeyDictionary

from dsp_fast import reference as ref
from dsp_fast.config import Config
from dsp_fast.engine import memory_model as mm
from dsp_fast.models import build_student_teacher

MIB = 2**20


MASK_INDEXED = (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default,
                torch.ops.aten._index_put_impl_.default)


def _all_positions(mask: torch.Tensor) -> torch.Tensor:
    """nonzero(mask) with every element selected: the largest tensors a mask can lead to."""
    return torch.empty(mask.numel(), mask.dim(), dtype=torch.int64, device=mask.device)


class HostReads(TorchDispatchMode):
    """What the reference does with values, on fake tensors: a host read answers 1 (True, 1.0); a boolean mask
    selects every element (its HSV sectors: temporaries of the augmentation, before the student's forwards, so
    not at the step's peak). Operators on its host-side draws (`host`: the strong augmentation's real CPU tensors,
    and whatever is computed from them alone) run for real, so the jitter order and blur kernel follow real draws."""

    def __init__(self, host: list[torch.Tensor]) -> None:
        super().__init__()
        self.host = WeakIdKeyDictionary({t: True for t in host if isinstance(t, torch.Tensor)})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if tensors and all(t in self.host for t in tensors):
            with _disable_current_modes():
                out = func(*args, **kwargs)
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.host[t] = True
            return out
        if func is torch.ops.aten._local_scalar_dense.default:
            return {torch.bool: True}.get(args[0].dtype, 1.0 if args[0].is_floating_point() else 1)
        if func is torch.ops.aten.nonzero.default:
            return _all_positions(args[0])
        if func in MASK_INDEXED and any(i is not None and i.dtype == torch.bool for i in args[1]):
            # a boolean mask index as torch decomposes it: its nonzero positions
            index = [j for i in args[1] for j in (_all_positions(i).unbind(1) if i is not None and i.dtype == torch.bool
                                                  else (i,))]
            return func(args[0], index, *args[2:], **kwargs)
        return func(*args, **kwargs)


def reference_inputs(cfg: Config, device: torch.device) -> tuple[list[torch.Tensor], ref.StepChoices]:
    """One step's batch and choices as `reference.next_batch` hands them over (fp32 images, int64 labels, the
    long-tail crops and class choice on the device, the augmentation draws on the host), with every long-tail crop
    found and both augmentation coins up."""
    w, h = cfg.data.crop_size
    b, d = cfg.data.batch_size, cfg.dsp
    img = lambda *lead: torch.zeros(*lead, 3, h, w, device=device)  # noqa: E731
    lab = lambda *lead: torch.zeros(*lead, h, w, dtype=torch.int64, device=device)  # noqa: E731
    batch = [img(b), lab(b), img(b), lab(b), img(b)]
    classes = d.long_tail_classes[: d.num_long_tail]
    long_tail = [[(c, img(), lab()) for c in classes] for _ in range(b)]
    with _disable_current_modes():  # drawn on the host, as the reference draws them
        gen = torch.Generator().manual_seed(0)
        aug = [ref.draw_strong_aug(b, (h, w), True, True, d.jitter_strength, gen) for _ in range(2)]
    class_sel = torch.zeros(b, cfg.model.num_classes + 1, dtype=torch.bool, device=device)
    return batch, ref.StepChoices(class_sel, long_tail, *aug)


@dataclasses.dataclass
class ReferenceStep:
    """The reference's models (as `build_run` builds them), optimizer and one step's inputs; call it with the step
    number to run `reference.train_step`."""

    cfg: Config
    student: torch.nn.Module
    teacher: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batch: list[torch.Tensor]
    choices: ref.StepChoices

    def __call__(self, step: int) -> None:
        ref.train_step(self.cfg, self.student, self.teacher, self.optimizer, step, self.batch, self.choices)


@contextlib.contextmanager
def reference_run(cfg: Config, fake: bool = True, device: torch.device | None = None) -> Iterator[ReferenceStep]:
    """The reference trainer's step on `device` (default CPU); fake: on fake CPU tensors (no weights file)."""
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=""))
    device = device or torch.device("cpu")
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=[]))
        if fake:
            models = mm.meta_models(cfg)
            stack.enter_context(FakeTensorMode())
            student, teacher = mm.with_fake_storage(models, device)
        else:
            torch.manual_seed(cfg.train.seed)
            student, teacher = build_student_teacher(cfg.model, device)  # as reference.build_run
        optimizer = ref.build_optimizer(cfg, student)
        for g in optimizer.param_groups:  # torch's default on CUDA tensors (CPU tensors default to the for loop)
            if g.get("foreach", False) is None:
                g["foreach"] = True
        batch, choices = reference_inputs(cfg, device)
        if fake:
            aug = [getattr(a, f.name) for a in (choices.aug_src, choices.aug_tgt) for f in dataclasses.fields(a)]
            stack.enter_context(HostReads(aug))
        yield ReferenceStep(cfg, student, teacher, optimizer, batch, choices)


def track_reference_step(step: ReferenceStep, around: contextlib.AbstractContextManager | None = None
                         ) -> mm.MemoryReport:
    """One warm step (momentum buffers made), then one under LiveBytes (and `around`)."""
    step(0)
    tracker = mm.LiveBytes()
    for m in (step.student, step.teacher):
        tracker.register("weights", [*m.parameters(), *m.buffers()])
    tracker.register("optimizer", [v for s in step.optimizer.state.values() for v in s.values()])
    lt = [t for crops in step.choices.long_tail for _, *pair in crops for t in pair]
    tracker.register("dsp_buffers", [*step.batch, step.choices.class_sel, *lt])
    tracker.watch_gradients(step.student.parameters())
    tracker.at_start = tracker.total
    with tracker, around or contextlib.nullcontext():
        step(1)
    return tracker.report()


def predict_reference_step(cfg: Config) -> mm.MemoryReport:
    """The reference trainer's step on one CUDA device (fp32, NCHW, eager), on fake CPU tensors."""
    with reference_run(cfg, fake=True) as step:
        report = track_reference_step(step)
    report.settings = {"amp": "fp32", "channels_last": False, "graphs": False,
                       "optimizer": f"{cfg.optim.algorithm} (torch default: foreach)",
                       "batch_per_rank": cfg.data.batch_size, "crop": list(cfg.data.crop_size),
                       "arch": cfg.model.arch, "fused_kernels": False}
    return report


class AllocatorPeak:
    """The CPU allocator's own peak over a region, from torch.profiler's allocation events (reported by the
    allocator, below any dispatch): bytes allocated since the region began minus bytes freed (tensors older than
    the region count negative when freed), at its largest. Kernel-internal buffers count here and not in
    LiveBytes, as cuDNN's workspaces count in torch.cuda.max_memory_allocated."""

    def __enter__(self) -> AllocatorPeak:
        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        self.prof.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.prof.__exit__(*exc)
        totals, todo = [0], list(self.prof.profiler.kineto_results.experimental_event_tree())
        while todo:
            node = todo.pop()
            todo.extend(node.children)
            if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
                totals.append(node.extra_fields.total_allocated)
        self.peak_delta = max(totals)


def check_on_cpu(cfg: Config) -> dict[str, dict[str, float]]:
    """Each trainer's step on fake tensors beside the same step on real CPU tensors (the kernels as this machine
    runs them on both sides): peak MiB predicted, live tensor bytes measured, the allocator's peak measured."""
    out = {}
    for name in ("fast", "reference"):
        if name == "fast":
            predicted = mm.predict_fast_step(cfg, cuda_kernels=False)
            probe = AllocatorPeak()
            with mm.cuda_like_trainer(cfg, fake=False, cuda_kernels=False) as (run, batch):
                real = mm.track_trainer_step(run, batch, around=probe)
        else:
            predicted = predict_reference_step(cfg)
            probe = AllocatorPeak()
            with reference_run(cfg, fake=False) as step:
                real = track_reference_step(step, around=probe)
        out[name] = {"predicted_mib": predicted.peak / MIB, "live_tensors_mib": real.peak / MIB,
                     "allocator_mib": (real.at_start + probe.peak_delta) / MIB,
                     "predicted_by_category_mib": {k: v / MIB for k, v in predicted.at_peak.items()},
                     "live_by_category_mib": {k: v / MIB for k, v in real.at_peak.items()}}
    return out
