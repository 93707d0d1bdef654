"""Peak device memory of one fast training step, predicted without a GPU, and the line the trainer prints beside
`torch.cuda.max_memory_allocated` once its first steps are done (`python -m bench.memory` makes the table).

How: the `Trainer` itself is built under FakeTensorMode (shapes, dtypes and strides, no storage, no weights file)
and stepped twice through `Trainer.step`, with a loader that hands it one batch of the loader's shapes; the second
step runs under `LiveBytes`, a dispatch mode that follows every tensor storage from the operator that creates it
to its release and keeps the breakdown by category at the moment the total was largest. A change of the step
(method.py, engine/step.py) or of the trainer's assembly is in the prediction without a change here. Two calls of
the trainer's constructor cannot run on fake tensors and are swapped for the prediction: `build_models` (the
models are built on meta, then given fake storage) and `apply_channels_last` (Module.to cannot swap fake
parameters: it is applied on meta first).

Fake CPU tensors, not fake cuda: on a CPU build of torch, autograd on fake cuda tensors asks the CUDA runtime for a
stream (FACTS.md), so no backward can run. The step runs on fake tensors of the CPU device with the CUDA path's
settings instead: autocast in the dtype `fast.amp` gives on CUDA (bf16 for 'auto'), channels_last, autocast's
weight cache off when graphs are on (as under capture), fused SGD / AdamW, the value checks off, and the fused
kernels' operators (their fake implementations return exactly the kernel's outputs) where the CPU would run the
twins. Left out: CPU autocast's op lists where they differ from CUDA's, operators lowered differently on CUDA
(cuDNN's batch norm keeps a reserve buffer; attention runs as `_scaled_dot_product_flash_attention_for_cpu`, which
saves what flash attention saves), cuDNN / cuBLAS workspaces and autotuning, the caching allocator's rounding and
fragmentation, kernel-internal scratch (the adjoint map's (B, H, w) row buffer, 0.3 MiB at the paper's shapes),
DDP's gradient buckets, the CUDA context. So the measured peak should sit at or a little above the prediction.

Categories: weights (student and teacher parameters and buffers), optimizer (its state: momentum, AdamW's two
moments; the lr tensors), gradients (`.grad` of the student, fp32, alive from the backward to the next step's
zero_grad), activations (created in the forward: what autograd saves and the temporaries alive), backward
(created in the backward and not a `.grad`: gradient temporaries), update (optimizer step, EMA, loss sums),
dsp_buffers (the step's static inputs, `StepBuffers` with its `DeviceChoices` and the long-tail crops, plus the
loader's uint8 batch on the device), other (the step context's scalars).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

from dsp_fast.config import Config
from dsp_fast.engine import trainer as trainer_mod
from dsp_fast.engine.distributed import DistInfo, per_rank_batch
from dsp_fast.engine.model_setup import apply_channels_last
from dsp_fast.engine.options import AMP_DTYPES, amp_dtype, graphs_on
from dsp_fast.kernels import HAS_TRITON, set_value_checks, soft_paste, upsample_pool
from dsp_fast.kernels import _common as kernel_flags
from dsp_fast.kernels._common import twins_forced
from dsp_fast.models import build_student_teacher

CATEGORIES = ("weights", "optimizer", "gradients", "activations", "backward", "update", "dsp_buffers", "other")
GIB = 2**30
CUDA = torch.device("cuda")


@dataclasses.dataclass
class MemoryReport:
    """Bytes at the peak of one step, by category (CATEGORIES); `phase`: the category of the allocation that made
    the peak (activations: in the forward, backward, update)."""

    peak: int
    at_peak: dict[str, int]
    phase: str
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    at_start: int = 0  # bytes registered before the step (what lives across steps)

    def gib(self, *categories: str) -> float:
        return sum(self.at_peak.get(c, 0) for c in categories) / GIB if categories else self.peak / GIB


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
            ref, old, cat = self.live[key]
            if not move and old == n:
                return
            self.now[cat] -= old
            self.total -= old
            category = category if move else cat
        else:
            ref = weakref.ref(st, lambda _, k=key: self._free(k))
        self.live[key] = (ref, n, category)
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
        self._handles.append(register_optimizer_step_pre_hook(self._updating))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        super().__exit__(*exc)

    def _updating(self, *_: Any) -> None:
        self.updating = True

    def report(self, settings: dict[str, Any] | None = None) -> MemoryReport:
        return MemoryReport(self.peak, dict(self.at_peak), self.phase_at_peak, settings or {}, self.at_start)


def cuda_settings(cfg: Config) -> Config:
    """The config whose CPU trainer takes the decisions the CUDA trainer takes: fast.amp as CUDA resolves it,
    torch.compile off (its memory planning is not modelled), no weights file (shapes only), the torch data backend
    (the loader is replaced), torch's fused SGD for apex's (the same momentum buffer per parameter; apex may not
    import here)."""
    amp = next(k for k, v in AMP_DTYPES.items() if v == amp_dtype(cfg.fast, CUDA))
    optimizer = "fused" if cfg.fast.optimizer == "apex" else cfg.fast.optimizer
    fast = dataclasses.replace(cfg.fast, amp=amp, compile="off", data_backend="torch", optimizer=optimizer)
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


def meta_models(cfg: Config) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Student and teacher as `build_student_teacher` makes them, on the meta device: no initialisation, no
    weights file. Build them outside any FakeTensorMode."""
    with torch.device("meta"):
        return build_student_teacher(cfg.model, torch.device("meta"))


def with_fake_storage(models: tuple[torch.nn.Module, ...], device: torch.device) -> tuple[torch.nn.Module, ...]:
    """The meta models given fake storage on `device`, inside the active FakeTensorMode."""
    mode = torch._guards.detect_fake_mode()
    mode.allow_non_fake_inputs = True  # to_empty reads the meta tensors' shapes
    try:
        for m in models:
            m.to_empty(device=device)
    finally:
        mode.allow_non_fake_inputs = False
    return models


@contextlib.contextmanager
def _swapped(obj: Any, name: str, value: Any) -> Iterator[None]:
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


@contextlib.contextmanager
def cuda_kernel_dispatch() -> Iterator[None]:
    """The kernels' dispatch as on CUDA tensors: their operators (fake implementations on fake tensors) wherever
    Triton is installed, the twins inside force_twins()."""
    rule = lambda t: HAS_TRITON and not twins_forced()  # noqa: E731
    with _swapped(soft_paste, "use_triton", rule), _swapped(upsample_pool, "use_triton", rule):
        yield


def _tensor_fields(obj: Any) -> list[torch.Tensor]:
    return [getattr(obj, f.name) for f in dataclasses.fields(obj)]  # dataclasses.astuple would deep-copy them


def track_trainer_step(run: trainer_mod.Trainer, batch: dict[str, torch.Tensor], warm_steps: int = 1,
                       around: contextlib.AbstractContextManager | None = None) -> MemoryReport:
    """`warm_steps` steps of the trainer (buffers made, optimizer state created), then one more under LiveBytes
    (and `around`, a second probe) with everything that lives across steps registered."""
    run.loader = itertools.repeat(batch)
    for _ in range(warm_steps):
        run.step()
    ctx, tracker = run.ctx, LiveBytes()
    models = (run.student, run.teacher)
    tracker.register("weights", itertools.chain.from_iterable(
        itertools.chain(m.parameters(), m.buffers()) for m in models))
    tracker.register("optimizer", [v for s in run.optimizer.state.values() for v in s.values()])
    tracker.register("optimizer", [g["lr"] for g in run.optimizer.param_groups])
    buf = run.buf
    tracker.register("dsp_buffers", [buf.x_s, buf.y_s, buf.x_m, buf.y_m, buf.x_t,
                                     *_tensor_fields(buf.choices), *batch.values()])
    tracker.register("other", [ctx.step_t, ctx.found_inf, ctx.counts, *ctx.sums.values()])
    tracker.watch_gradients(run.student.parameters())
    tracker.at_start = tracker.total
    with tracker, around or contextlib.nullcontext():
        run.step()
    return tracker.report()


@contextlib.contextmanager
def cuda_like_trainer(cfg: Config, world_size: int = 1, fake: bool = True, cuda_kernels: bool = True
                      ) -> Iterator[tuple[trainer_mod.Trainer, dict[str, torch.Tensor]]]:
    """A CPU `Trainer` that takes the CUDA trainer's decisions (cuda_settings; autocast's weight cache as under
    graphs; value checks off), with one loader batch of one rank's shapes. fake: on fake tensors (no storage, no
    weights); otherwise real CPU tensors. cuda_kernels: the kernels' operators as on CUDA (else this machine's
    rule: the twins, or the Triton interpreter under TRITON_INTERPRET=1). The CPU RNG is restored after."""
    cpu_cfg = cuda_settings(cfg)
    b = per_rank_batch(cfg.data.batch_size, world_size)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=[]))
        if cuda_kernels:
            stack.enter_context(cuda_kernel_dispatch())
        if fake:
            models = meta_models(cpu_cfg)
            if cpu_cfg.fast.channels_last:  # Module.to cannot swap fake parameters: the trainer's call, made on meta
                apply_channels_last(*models)
            # the trainer's two calls that cannot run on fake tensors: its models, given fake storage instead
            # (to_empty keeps the memory format), and channels_last, already applied
            stack.enter_context(_swapped(trainer_mod, "build_models",
                                         lambda _cfg, device: with_fake_storage(models, device)))
            stack.enter_context(_swapped(trainer_mod, "apply_channels_last", lambda *_: None))
            stack.enter_context(FakeTensorMode())
        stack.callback(set_value_checks, kernel_flags._value_checks)  # as it was (a CUDA run has them off)
        set_value_checks(False)  # as on CUDA (engine.trainer.value_checks_wanted); fake tensors hold no values
        run = trainer_mod.Trainer(cpu_cfg, DistInfo(), ("", ""), say=lambda _: None)
        stack.callback(run.close)
        run.ctx.autocast_cache = not graphs_on(cfg.fast, CUDA)  # as the CUDA trainer: no cache under capture
        yield run, loader_batch(cfg, b, torch.device("cpu"))


def predict_fast_step(cfg: Config, world_size: int = 1, cuda_kernels: bool = True) -> MemoryReport:
    """The fast trainer's step on one CUDA device (one rank of `world_size`), on fake CPU tensors (module doc)."""
    with cuda_like_trainer(cfg, world_size, fake=True, cuda_kernels=cuda_kernels) as (run, batch):
        report = track_trainer_step(run, batch)
    report.settings = {"amp": cuda_settings(cfg).fast.amp, "channels_last": cfg.fast.channels_last,
                       "graphs": graphs_on(cfg.fast, CUDA),
                       "optimizer": f"{cfg.optim.algorithm} ({cfg.fast.optimizer})",
                       "batch_per_rank": per_rank_batch(cfg.data.batch_size, world_size),
                       "crop": list(cfg.data.crop_size), "arch": cfg.model.arch,
                       "fused_kernels": HAS_TRITON and cuda_kernels}
    return report


TABLE = (("weights", ("weights",)), ("optimizer", ("optimizer",)), ("gradients", ("gradients",)),
         ("activations", ("activations", "backward", "update", "other")), ("DSP buffers", ("dsp_buffers",)))
"""The reported columns: activations hold what the forward saved and every temporary alive (forward, backward,
update); 'other' (the step context's scalars, bytes) goes with them."""

_reported: weakref.WeakSet = weakref.WeakSet()


def memory_line(pred: MemoryReport, measured_bytes: int | None, seconds: float | None = None) -> str:
    """One line: the predicted peak by column, and the measured peak beside it (with the ratio)."""
    parts = ", ".join(f"{name} {pred.gib(*cats):.2f}" for name, cats in TABLE)
    line = f"[memory] one step's peak predicted {pred.gib():.2f} GiB ({parts})"
    if measured_bytes is not None:
        line += (f"; torch.cuda.max_memory_allocated {measured_bytes / GIB:.2f} GiB (x{measured_bytes / pred.peak:.2f}"
                 "; the prediction leaves out cuDNN workspaces and the allocator's rounding)")
    return line + (f"; predicted in {seconds:.1f} s on the CPU" if seconds is not None else "")


def report_peak_once(run: trainer_mod.Trainer, done: int) -> None:
    """On CUDA, rank 0, at the first log step after the graph's warm-up and capture (once per trainer): the
    predicted peak of one step beside torch.cuda.max_memory_allocated so far, printed and in metrics.jsonl. A
    prediction that fails is said and skipped: it never stops a run."""
    info = run.info
    ran = getattr(run.step_fn, "calls", done)  # a graphed step counts its calls in this process (a resumed run)
    if info.device.type != "cuda" or not info.is_main or run in _reported or ran <= run.warmup_steps:
        return
    _reported.add(run)
    measured = torch.cuda.max_memory_allocated(info.device)
    t0 = time.perf_counter()
    try:
        pred = predict_fast_step(run.cfg, info.world_size)
    except Exception as e:  # noqa: BLE001 - a diagnostic only
        run.say(f"[memory] no prediction of the step's peak ({type(e).__name__}: {e})")
        return
    run.say(memory_line(pred, measured, time.perf_counter() - t0))
    run.log.metrics(done, {"memory/predicted_peak_gib": pred.gib(), "memory/max_allocated_gib": measured / GIB})
