"""Will it fit on my card: the peak device memory of one training step, predicted without a GPU, for every preset:
the fast trainer as it runs on CUDA and the reference trainer (fp32, NCHW, eager), split into weights, optimizer
state, gradients, activations and DSP buffers at the peak. One rank; the CUDA context (about 0.5 GiB) comes on top.

    python -m bench.memory [--config PRESET ...] [--check-cpu [PRESET]] [--measure-cuda] [--out DIR] [key=value ...]

How: each trainer's own step runs on fake CPU tensors (FakeTensorMode: shapes, dtypes and strides, no storage; on a
CPU build of torch, autograd on fake cuda tensors asks the CUDA runtime for a stream), a warm step then one under
`LiveBytes`: the fast `Trainer` with the CUDA path's settings (`cuda_like_trainer`), the reference's `train_step`
with every long-tail crop found, both augmentation coins up and its host reads answered (`HostReads`). Left out, so
a measured peak should sit at or a little above the prediction: cuDNN / cuBLAS workspaces, the caching allocator's
rounding, operators lowered differently on CUDA, kernel-internal scratch, DDP's gradient buckets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import os
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch._C._profiler import _EventType
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils.weak import WeakIdKeyDictionary

from bench.provenance import parse_args, result_env, stamped, tool_parser, write_result
from dsp_fast import reference as ref
from dsp_fast.config import Config, load_config, preset_names
from dsp_fast.engine.distributed import DistInfo
from dsp_fast.engine.model_setup import apply_channels_last, fused_bn_wanted
from dsp_fast.engine.trainer import AMP_DTYPES, Trainer, amp_dtype, graphs_on
from dsp_fast.kernels import HAS_TRITON, force_kernels, interpreting, set_value_checks
from dsp_fast.models import build_student_teacher

# weights: both models' parameters and buffers; optimizer: its state and lr tensors; gradients: the student's .grad;
# activations / backward / update: created in the forward / backward / optimizer step and EMA; dsp_buffers: the
# step's static inputs and the loader's batch; other: the step context's scalars
CATEGORIES = ("weights", "optimizer", "gradients", "activations", "backward", "update", "dsp_buffers", "other")
GIB, MIB = 2**30, 2**20
CUDA = torch.device("cuda")
TRAINERS = ("fast", "reference")
TABLE = (("weights", ("weights",)), ("optimizer", ("optimizer",)), ("gradients", ("gradients",)),
         ("activations", ("activations", "backward", "update", "other")), ("DSP buffers", ("dsp_buffers",)))
"""The reported columns: activations hold what the forward saved and every temporary alive (forward, backward,
update); 'other' (the step context's scalars, bytes) goes with them."""
PHASES = {"activations": "forward", "backward": "backward", "update": "update"}


def _storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    try:
        return [t.untyped_storage()]
    except (RuntimeError, NotImplementedError):  # no storage (a sparse or nested tensor): nothing to count
        return []


class LiveBytes(TorchDispatchMode):
    """Live tensor bytes by category over a region: a storage is counted from the operator that returns it until
    it is freed (a weak reference's callback), views once. Storages that exist before the region count only when
    `register`ed. New storages take the phase's category: 'backward' while autograd runs a backward, 'update'
    after an optimizer's step has begun, 'activations' otherwise; a parameter's gradient moves to 'gradients' when
    it is accumulated. Works alike on real and fake tensors (torch's own MemTracker does the same bookkeeping but
    registers a gradient hook on every parameter it meets, which raises on frozen ones, and refuses a module
    called twice in one step: the teacher, DeepLab's frozen BN and the student's three forwards)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[weakref.ref, int, str]] = {}
        self.now = dict.fromkeys(CATEGORIES, 0)
        self.total = self.peak = self.at_start = 0
        self.at_peak = dict(self.now)
        self.phase_at_peak = ""
        self.updating = False
        self._handles: list[Any] = []

    def register(self, category: str, tensors: Iterable[torch.Tensor | None]) -> None:
        """Count tensors that exist already (weights, optimizer state, buffers) under `category`."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                for st in _storages(t):
                    self._add(st, category, move=True)

    def watch_gradients(self, params: Iterable[torch.Tensor]) -> None:
        def moved(p: torch.Tensor) -> None:
            self.register("gradients", [p.grad])

        for p in params:
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(moved))
                self.register("gradients", [p.grad])

    def _add(self, st: torch.UntypedStorage, category: str, move: bool = False) -> None:
        key, n = id(st), st.nbytes()
        if key in self.live:
            ref_, old, cat = self.live[key]
            if not move and old == n:
                return
            self.now[cat] -= old
            self.total -= old
            category = category if move else cat
        else:
            ref_ = weakref.ref(st, lambda _, k=key: self._free(k))
        self.live[key] = (ref_, n, category)
        self.now[category] += n
        self.total += n
        if self.total > self.peak:
            self.peak, self.at_peak, self.phase_at_peak = self.total, dict(self.now), category

    def _free(self, key: int) -> None:
        _, n, cat = self.live.pop(key)
        self.now[cat] -= n
        self.total -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "dsp_fast" and interpreting():
            # the Triton interpreter keeps a launch's arguments in reference cycles: collected now, as a GPU
            # launch frees them, or the real CPU step counts them alive until the next collection
            gc.collect()
        if torch._C._current_graph_task_id() != -1:
            phase = "backward"
        else:
            phase = "update" if self.updating else "activations"
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                for st in _storages(t):
                    self._add(st, phase)
        return out

    def __enter__(self) -> LiveBytes:
        self._handles.append(register_optimizer_step_pre_hook(lambda *_: setattr(self, "updating", True)))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        super().__exit__(*exc)


# ------------------------------------------------------------------------------------------------ the fast step
def cuda_settings(cfg: Config) -> Config:
    """The config whose CPU trainer takes the decisions the CUDA trainer takes: fast.amp as CUDA resolves it,
    torch.compile off (its memory planning is not modelled), no weights file (shapes only), the torch data backend
    (the loader is replaced), torch's fused SGD for apex's (the same momentum buffer per parameter), the fused
    batch norm where CUDA takes it."""
    amp = next(k for k, v in AMP_DTYPES.items() if v == amp_dtype(cfg.fast, CUDA))
    optimizer = "fused" if cfg.fast.optimizer == "apex" else cfg.fast.optimizer
    fused_bn = "always" if fused_bn_wanted(cfg.fast.fused_bn, CUDA) else "never"
    fast = dataclasses.replace(cfg.fast, amp=amp, compile="off", data_backend="torch", optimizer=optimizer,
                               fused_bn=fused_bn)
    return dataclasses.replace(cfg, fast=fast, model=dataclasses.replace(cfg.model, pretrained=""))


def loader_batch(cfg: Config, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One batch of the step loader's shapes and dtypes (pipelines/loader.py): uint8 crops, L long-tail crops per
    template image (the most a step draws)."""
    w, h = cfg.data.crop_size
    n_lt = cfg.dsp.num_long_tail if cfg.dsp.enabled else 0

    def u8(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.uint8, device=device)

    return {"src_img": u8(batch, 3, h, w), "src_label": u8(batch, h, w), "tmpl_img": u8(batch, 3, h, w),
            "tmpl_label": u8(batch, h, w), "lt_img": u8(batch * n_lt, 3, h, w), "lt_label": u8(batch * n_lt, h, w),
            "lt_class": torch.zeros(n_lt, dtype=torch.int64, device=device), "tgt_img": u8(batch, 3, h, w)}


def fake_models(cfg: Config, channels_last: bool = False) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Student and teacher as `build_student_teacher` makes them, built on meta (no initialisation, no weights
    file; channels_last applied there, as Module.to cannot convert fake parameters), then given fake CPU storage
    in the active FakeTensorMode (to_empty keeps the memory format)."""
    mode = torch._guards.detect_fake_mode()
    with _disable_current_modes(), torch.device("meta"):
        models = build_student_teacher(cfg.model, torch.device("meta"))
        if channels_last:
            apply_channels_last(*models)
    mode.allow_non_fake_inputs = True  # to_empty reads the meta tensors' shapes
    try:
        for m in models:
            m.to_empty(device=torch.device("cpu"))
    finally:
        mode.allow_non_fake_inputs = False
    return models


@dataclasses.dataclass
class Stepper:
    """One trainer as the tools step it: `step()` one training step; `inputs()` the step's inputs that live across
    steps (read after a step), by LiveBytes category."""

    step: Callable[[], object]
    student: torch.nn.Module
    teacher: torch.nn.Module
    optimizer: torch.optim.Optimizer
    inputs: Callable[[], dict[str, list]]


@contextlib.contextmanager
def cuda_like_trainer(cfg: Config, fake: bool = True, cuda_kernels: bool = True) -> Iterator[Stepper]:
    """A CPU `Trainer` that takes the CUDA trainer's decisions (cuda_settings; autocast's weight cache as under
    graphs; value checks off), its loader one batch of the loader's shapes. fake: on fake tensors (no storage, no
    weights); otherwise real CPU tensors. cuda_kernels: the kernels' operators as on CUDA (else this machine's
    rule: the twins, or the Triton interpreter under TRITON_INTERPRET=1). The CPU RNG is restored after."""
    cpu_cfg = cuda_settings(cfg)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=[]))
        stack.enter_context(force_kernels(cuda_kernels))
        models = None
        if fake:
            stack.enter_context(FakeTensorMode())
            models = fake_models(cpu_cfg, cpu_cfg.fast.channels_last)
        set_value_checks(False)  # as on CUDA (engine.trainer.value_checks_wanted); fake tensors hold no values
        stack.callback(set_value_checks, True)  # the default, which every CPU run keeps
        run = Trainer(cpu_cfg, DistInfo(), ("", ""), say=lambda _: None, models=models)
        stack.callback(run.close)
        run.ctx.autocast_cache = not graphs_on(cfg.fast, CUDA)  # as the CUDA trainer: no cache under capture
        run.loader = itertools.repeat(loader_batch(cfg, run.batch, torch.device("cpu")))

        def inputs() -> dict[str, list]:
            ctx, buf, choices = run.ctx, run.buf, run.buf.choices
            return {"dsp_buffers": [buf.x_s, buf.y_s, buf.x_m, buf.y_m, buf.x_t, *next(run.loader).values(),
                                    *(getattr(choices, f.name) for f in dataclasses.fields(choices))],
                    "other": [ctx.step_t, ctx.found_inf, ctx.counts, *ctx.sums.values()]}

        yield Stepper(run.step, run.student, run.teacher, run.optimizer, inputs)


def track_step(s: Stepper, around: contextlib.AbstractContextManager | None = None) -> LiveBytes:
    """One warm step (buffers made, optimizer state created), then one more under LiveBytes (and `around`, a second
    probe) with everything that lives across steps registered."""
    s.step()
    tracker = LiveBytes()
    tracker.register("weights", [t for m in (s.student, s.teacher) for t in (*m.parameters(), *m.buffers())])
    tracker.register("optimizer", [*(v for st in s.optimizer.state.values() for v in st.values()),
                                   *(g["lr"] for g in s.optimizer.param_groups)])
    for category, tensors in s.inputs().items():
        tracker.register(category, tensors)
    tracker.watch_gradients(s.student.parameters())
    tracker.at_start = tracker.total
    with tracker, around or contextlib.nullcontext():
        s.step()
    return tracker


# ------------------------------------------------------------------------------------------- the reference step
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
    long_tail = [[(c, img(), lab()) for c in d.long_tail_classes[: d.num_long_tail]] for _ in range(b)]
    with _disable_current_modes():  # drawn on the host, as the reference draws them
        gen = torch.Generator().manual_seed(0)
        aug = [ref.draw_strong_aug(b, (h, w), True, True, d.jitter_strength, gen) for _ in range(2)]
    class_sel = torch.zeros(b, cfg.model.num_classes + 1, dtype=torch.bool, device=device)
    return batch, ref.StepChoices(class_sel, long_tail, *aug)


@contextlib.contextmanager
def reference_run(cfg: Config, fake: bool = True, device: torch.device | None = None) -> Iterator[Stepper]:
    """The reference's models (as `reference.build_run` builds them), optimizer and `train_step` on `device`
    (default CPU) with one step's inputs; fake: on fake CPU tensors (no weights file)."""
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=""))
    device = device or torch.device("cpu")
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=[]))
        if fake:
            stack.enter_context(FakeTensorMode())
            student, teacher = fake_models(cfg)
        else:
            torch.manual_seed(cfg.train.seed)
            student, teacher = build_student_teacher(cfg.model, device)
        optimizer = ref.build_optimizer(cfg, student)
        for g in optimizer.param_groups:  # torch's default on CUDA tensors (CPU tensors default to the for loop)
            if g.get("foreach", False) is None:
                g["foreach"] = True
        batch, choices = reference_inputs(cfg, device)
        if fake:
            stack.enter_context(HostReads([getattr(a, f.name) for a in (choices.aug_src, choices.aug_tgt)
                                           for f in dataclasses.fields(a)]))
        steps, lt = itertools.count(), [t for crops in choices.long_tail for _, *pair in crops for t in pair]
        yield Stepper(lambda: ref.train_step(cfg, student, teacher, optimizer, next(steps), batch, choices),
                      student, teacher, optimizer, lambda: {"dsp_buffers": [*batch, choices.class_sel, *lt]})


def stepper(cfg: Config, trainer: str, fake: bool = True, cuda_kernels: bool = True
            ) -> contextlib.AbstractContextManager[Stepper]:
    """`trainer`'s step (TRAINERS) as it runs on one CUDA device, on CPU tensors (fake ones by default)."""
    return cuda_like_trainer(cfg, fake, cuda_kernels) if trainer == "fast" else reference_run(cfg, fake)


def predict(cfg: Config, trainer: str, cuda_kernels: bool = True) -> LiveBytes:
    """`trainer`'s step on one CUDA device (the reference's: fp32, NCHW, eager), on fake CPU tensors."""
    with stepper(cfg, trainer, cuda_kernels=cuda_kernels) as s:
        return track_step(s)


# ------------------------------------------------------------------------------------------- beside measurements
class AllocatorPeak:
    """The CPU allocator's own peak over a region, from torch.profiler's allocation events (reported by the
    allocator, below any dispatch): bytes allocated since the region began minus bytes freed, at its largest.
    Kernel-internal buffers count here and not in LiveBytes, as cuDNN's workspaces count in
    torch.cuda.max_memory_allocated."""

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
    for name in TRAINERS:
        predicted, probe = predict(cfg, name, cuda_kernels=False), AllocatorPeak()
        with stepper(cfg, name, fake=False, cuda_kernels=False) as s:
            real = track_step(s, around=probe)
        out[name] = {"predicted_mib": predicted.peak / MIB, "live_tensors_mib": real.peak / MIB,
                     "allocator_mib": (real.at_start + probe.peak_delta) / MIB,
                     "predicted_by_category_mib": {k: v / MIB for k, v in predicted.at_peak.items()},
                     "live_by_category_mib": {k: v / MIB for k, v in real.at_peak.items()}}
    return out


def measure_on_device(cfg: Config, device: torch.device) -> dict[str, int]:
    """Both trainers for real on the GPU, one after the other, each from a reset peak: the fast `Trainer` (its
    loader one device batch of the loader's shapes) stepped through its warm-up and capture and two more steps;
    the reference's step twice. Returns each one's peak bytes minus what was allocated before."""

    def reset() -> int:
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)

    cfg = cuda_settings(cfg)
    base = reset()
    run = Trainer(cfg, DistInfo(device=device), ("", ""), say=lambda msg: print(msg, flush=True))
    run.loader = itertools.repeat(loader_batch(cfg, run.batch, device))
    with run.backends():
        for _ in range(run.warmup_steps + 2):
            run.step()
    out = {"fast": torch.cuda.max_memory_allocated(device) - base}
    run.close()
    del run
    base = reset()
    with reference_run(cfg, fake=False, device=device) as s:
        s.step()
        s.step()
        out["reference"] = torch.cuda.max_memory_allocated(device) - base
    return out


# ------------------------------------------------------------------------------------------------------ the tool
def fmt(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= GIB else f"{n_bytes / MIB:.1f} MiB"


def summary(cfg: Config, trainer: str) -> dict[str, Any]:
    """`trainer`'s prediction as the results file holds it: GiB per table column and per category at the peak, and
    the settings it assumes."""
    live, fast = predict(cfg, trainer), trainer == "fast"
    return {"peak_gib": live.peak / GIB, "peak_during": live.phase_at_peak, "before_step_gib": live.at_start / GIB,
            "columns_gib": {name: sum(live.at_peak[c] for c in cats) / GIB for name, cats in TABLE},
            "by_category_gib": {k: v / GIB for k, v in live.at_peak.items()},
            "settings": {"amp": cuda_settings(cfg).fast.amp if fast else "fp32",
                         "channels_last": fast and cfg.fast.channels_last, "graphs": fast and graphs_on(cfg.fast, CUDA),
                         "optimizer": f"{cfg.optim.algorithm} ({cfg.fast.optimizer if fast else 'torch foreach'})",
                         "fused_kernels": fast and HAS_TRITON}}


def markdown(results: dict[str, Any]) -> str:
    """The docs table: one row per preset and trainer."""
    cols = [name for name, _ in TABLE]
    lines = [f"| preset | model, crop, batch | trainer | {' | '.join(cols)} | peak | peak during |",
             "|" + "---|" * (len(cols) + 5)]
    for name, r in results["presets"].items():
        what = f"{r['model']}, {r['crop'][0]}x{r['crop'][1]}, {r['batch']}"
        for t in TRAINERS:
            p = r[t]
            cells = " | ".join(fmt(p["columns_gib"][c] * GIB) for c in cols)
            lines.append(f"| {name} | {what} | {t} | {cells} | **{fmt(p['peak_gib'] * GIB)}** | "
                         f"{PHASES.get(p['peak_during'], p['peak_during'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = tool_parser("bench.memory", __doc__)
    p.add_argument("--config", nargs="+", default=preset_names(), help="presets or YAML files (default: every preset)")
    p.add_argument("--check-cpu", nargs="?", const="synthetic", default="", metavar="PRESET",
                   help="a preset's steps at 48x48 also on real CPU tensors, beside their prediction")
    p.add_argument("--measure-cuda", action="store_true", help="measure both trainers on the GPU as well")
    p.add_argument("--out", default="", help="folder for memory_<date>_<time>.json and .md (default: print only)")
    args = parse_args(p, argv, overrides=True)
    results: dict[str, Any] = {"presets": {}}
    for name in args.config:
        cfg, t0 = load_config(name, args.overrides), time.perf_counter()
        r = results["presets"][name] = {t: summary(cfg, t) for t in TRAINERS}
        r.update(model=cfg.model.arch, crop=list(cfg.data.crop_size), batch=cfg.data.batch_size,
                 seconds=time.perf_counter() - t0)
        print(f"{name}: predicted peak fast {fmt(r['fast']['peak_gib'] * GIB)}, reference "
              f"{fmt(r['reference']['peak_gib'] * GIB)} ({r['seconds']:.1f} s)", flush=True)
    print(markdown(results))
    if args.check_cpu:
        cfg = load_config(args.check_cpu, ["data.crop_size=[48,48]"])
        results["cpu_check"] = {"config": args.check_cpu, "crop": [48, 48],
                                "triton_interpret": os.environ.get("TRITON_INTERPRET", ""), **check_on_cpu(cfg)}
        for t in TRAINERS:
            r = results["cpu_check"][t]
            print(f"CPU check {args.check_cpu} 48x48 {t}: predicted {r['predicted_mib']:.2f} MiB, live tensors "
                  f"{r['live_tensors_mib']:.2f} MiB, CPU allocator peak {r['allocator_mib']:.2f} MiB "
                  f"(x{r['allocator_mib'] / r['predicted_mib']:.2f})")
    if args.measure_cuda:
        name = args.config[0]
        measured = measure_on_device(load_config(name, args.overrides), CUDA)
        results["cuda_measured_gib"] = {name: {t: v / GIB for t, v in measured.items()}}
        for t in TRAINERS:
            pred = results["presets"][name][t]["peak_gib"] * GIB
            print(f"[memory] {name} {t}: predicted {fmt(pred)}, torch.cuda.max_memory_allocated "
                  f"{fmt(measured[t])} (x{measured[t] / pred:.2f})", flush=True)
    if args.out:
        stem = stamped(args.out, "memory")
        write_result(stem + ".json", {"env": result_env("cuda" if args.measure_cuda else "cpu", args.command),
                                      **results})
        with open(stem + ".md", "w") as f:
            f.write(markdown(results) + "\n")
        print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
