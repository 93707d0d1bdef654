"""A cost model of one DSP step, from counted FLOPs and bytes per operator: what the fast trainer should take on an
H100/H200 at the paper's config (a prediction, not a measurement), the reference trainer beside it, and the same
model on this CPU with rates measured when the command runs, checked against bench.profile_step.

    python -m bench.cost_model [--device h200] [--arch deeplabv2_r101] [--crop 512] [--batch 2] [--json OUT]
    python -m bench.cost_model --device cpu --compare [--steps 5]   # predicted vs profiled, per class (bench.cost_cpu)
    python -m bench.cost_model --plan [--device h200]               # what each remaining change saves (bench.cost_plan)

How: the step runs on the `meta` device (shapes only, no data, seconds on a CPU) under a dispatch mode that records
every aten operator with its FLOPs (torch.utils.flop_counter's formulas) and the bytes it reads and writes (its
input tensors, its outputs and the arguments it writes in place; views move nothing): bench.cost_step runs the
step's own code (dsp_fast.method.dsp_losses: teacher, class selection, pastes, augmentations, losses, MMD) with the
student's forward + backward (one call over 3B images, as fast.batched_student runs it; three for the reference),
then SGD with momentum and the EMA. The fast trainer runs them in bf16
(autocast's cast of the weights at every forward: the graph disables its cache), channels_last, the MMD as the
adjoint, the soft paste as one kernel, one CUDA graph; the reference in fp32 NCHW (cuDNN's default TF32 for
convolutions), the naive MMD and the twins, eager, one Python dispatch and launch per operator, per-parameter loops.

Each operator takes max(FLOPs / (matrix rate x efficiency), bytes / (bandwidth x efficiency)) plus a per-launch
overhead; convolutions and matmuls are matrix-rate ops, the rest is bandwidth-bound. The device figures and every
efficiency are assumptions printed with the result (DEVICES, EFFICIENCY below); the matrix rate and HBM bandwidth are
what was measured on an H200 (bf16 ~790 TFLOP/s dense, ~4.3 TB/s). The reference's data loading (PIL PNG decode of
the full-size images) is predicted apart: the step takes the slower of compute and data.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from dsp_fast.config import FastConfig

# measured on an H200 here (bf16 dense matmul, HBM copy); TF32 and fp32 SIMT rates are the datasheet ratios to bf16
DEVICES = {
    "h200": {"bf16_flops": 790e12, "tf32_flops": 395e12, "fp32_flops": 60e12, "hbm_bytes_per_s": 4.3e12},
    "h100": {"bf16_flops": 790e12, "tf32_flops": 395e12, "fp32_flops": 60e12, "hbm_bytes_per_s": 3.35e12},
}
EFFICIENCY = {
    "matrix": 0.55,  # cuDNN convolutions of ResNet-101 at batch 2: well below a large square matmul
    "memory": 0.75,  # elementwise and normalisation kernels of a few MB each
    "graph_kernel_s": 2e-6,  # per kernel inside a replayed CUDA graph
    "eager_op_s": 12e-6,  # per operator in eager PyTorch: Python, dispatch and launch, not overlapped at batch 2
    "png_decode_s": 0.030,  # one full-size GTA5/Cityscapes PNG decoded and resized by PIL, one core (measured here)
}
MATRIX_OPS = {"convolution", "convolution_backward", "mm", "bmm", "addmm", "baddbmm"}
MATMUL_OPS = {"mm", "bmm", "addmm", "baddbmm", "matmul"}
CLASSES = ("convolution", "batch norm", "matmul", "elementwise / reduction", "DSP ops", "optimizer + EMA")
FREE_OPS = {"detach", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh",
            "_local_scalar_dense"}
WRITE_ONLY = {"copy_", "fill_", "zero_", "uniform_", "normal_", "bernoulli_"}
# kernels that copy a non-contiguous input to a contiguous one inside (ATen's softmax, CPU and CUDA's host_softmax):
# a copy a dispatch mode never sees, found by the CPU check (the class logits are channels_last)
CONTIGUOUS_INSIDE = {"_softmax", "_log_softmax", "_softmax_backward_data", "_log_softmax_backward_data"}


def hidden_copy_bytes(name: str, args: tuple) -> float:
    """Bytes of the layout copies an operator makes inside (read + write of each tensor it converts)."""
    if name in CONTIGUOUS_INSIDE:
        return sum(2 * _nbytes(t) for t in args if isinstance(t, torch.Tensor) and not t.is_contiguous())
    if name == "convolution_backward" and args[1].dim() == 4:
        # the gradient is brought to the input's layout (the convolution's suggested memory format)
        fmt = torch.channels_last if args[1].is_contiguous(memory_format=torch.channels_last) and \
            not args[1].is_contiguous() else torch.contiguous_format
        return 0.0 if args[0].is_contiguous(memory_format=fmt) else 2 * _nbytes(args[0])
    return 0.0


@dataclasses.dataclass
class Op:
    name: str
    cls: str
    flops: float
    bytes: float
    phase: str = "forward"  # "backward" inside a recorded backward: fusion never crosses it
    ins: tuple[tuple[tuple, float], ...] = ()  # (tensor key, bytes) read; key: Counter._key
    outs: tuple[tuple[tuple, float], ...] = ()  # (tensor key, bytes) written (outputs and mutated arguments)
    launches: int = 1


def aten_class(name: str) -> str:
    """The class of an aten operator (its name without 'aten::'): the classes of bench.profile_step too."""
    if "convolution" in name or name.startswith("conv") or name == "_slow_conv2d_forward":
        return "convolution"
    if "batch_norm" in name:
        return "batch norm"
    if name in MATMUL_OPS:
        return "matmul"
    if name.startswith(("_foreach", "_fused_sgd")) or name == "_amp_foreach_non_finite_check_and_unscale_":
        return "optimizer + EMA"
    return "elementwise / reduction"


def op_class(name: str, part: str | None) -> str:
    """The class of a recorded operator: `part` when set (the DSP ops' range), else aten_class."""
    return aten_class(name) if part is None else part


def _nbytes(t: torch.Tensor) -> float:
    return float(t.numel() * t.element_size())


class Counter(TorchDispatchMode):
    """Records each aten operator's class, FLOPs and bytes moved: the tensors it reads (its inputs) and writes (its
    outputs and the arguments it mutates in place); views and allocations move nothing. `part` (when set) classes
    every operator, as profile_step's DSP ranges do; `phase` marks the backward. Tensors are keyed by identity
    (kept alive while counting; a view by the tensor it views and its place in it) so that a fusion can tell which
    operator produced what another reads."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Op] = []
        self.part: str | None = None
        self.phase = "forward"
        self._alive: list[torch.Tensor] = []

    def _key(self, t: torch.Tensor) -> tuple[int, int, int]:
        """(the storage's tensor, offset, elements): a view is keyed by the tensor it views, so that an operator
        reading a slice of another's output (the per-group batch norm's split) is seen as its consumer."""
        base = t if t._base is None else t._base
        self._alive += [t, base]
        return id(base), t.storage_offset(), t.numel()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        schema = func._schema
        is_view = any(r.alias_info is not None for r in schema.returns) and not schema.is_mutable
        if is_view or name in FREE_OPS:
            return out
        leaves = torch.utils._pytree.tree_leaves
        written = [t for a, v in zip(schema.arguments, args) if a.alias_info is not None and a.alias_info.is_write
                   for t in leaves(v) if isinstance(t, torch.Tensor)]
        ins = [t for t in leaves((args, kwargs)) if isinstance(t, torch.Tensor)
               and not (name in WRITE_ONLY and any(t is w for w in written))]  # copy_ / fill_ read no destination
        outs = written if schema.is_mutable else [t for t in leaves(out) if isinstance(t, torch.Tensor)]
        flops = flop_registry[func.overloadpacket](*args, **kwargs, out_val=out) \
            if func.overloadpacket in flop_registry else 0
        op = Op(name, op_class(name, self.part), float(flops), 0.0, self.phase,
                tuple((self._key(t), _nbytes(t)) for t in ins), tuple((self._key(t), _nbytes(t)) for t in outs))
        hidden = hidden_copy_bytes(name, args)
        op.bytes = sum(b for _, b in op.ins) + sum(b for _, b in op.outs) + hidden
        op.launches += hidden > 0
        self.ops.append(op)
        return out


def predict(ops: list[Op], matrix_flops: float, bytes_per_s: float, launch_s: float, per_param: int = 0) -> dict:
    """ms per class: each operator max(compute, memory) + launches x launch_s. per_param > 0: the reference's
    per-parameter loops, one launch per parameter where the fast path runs one foreach."""
    per_class: dict[str, dict] = collections.defaultdict(lambda: {"ops": 0, "gflop": 0.0, "gbyte": 0.0, "ms": 0.0})
    for op in ops:
        compute = op.flops / (matrix_flops * EFFICIENCY["matrix"]) if op.name in MATRIX_OPS else 0.0
        memory = op.bytes / (bytes_per_s * EFFICIENCY["memory"])
        launches = per_param if (per_param and op.name.startswith("_foreach")) else op.launches
        c = per_class[op.cls]
        c["ops"] += launches
        c["gflop"] += op.flops / 1e9
        c["gbyte"] += op.bytes / 1e9
        c["ms"] += 1e3 * (max(compute, memory) + launches * launch_s)
    total = sum(c["ms"] for c in per_class.values())
    return {"per_class": {k: per_class[k] for k in CLASSES if k in per_class}, "compute_ms": total}


def predict_gpu(ops: list[Op], dev: dict, fast: bool, n_params: int) -> dict:
    """The fast step (bf16 matrix rate, graph launches) or the reference (TF32, eager, per-parameter loops)."""
    if fast:
        return predict(ops, dev["bf16_flops"], dev["hbm_bytes_per_s"], EFFICIENCY["graph_kernel_s"])
    return predict(ops, dev["tf32_flops"], dev["hbm_bytes_per_s"], EFFICIENCY["eager_op_s"], per_param=n_params)


def run(device: str, arch: str, crop: int, batch: int, data_workers: int) -> dict:
    from bench.cost_step import record_step  # cost_step imports this module's Counter

    dev = DEVICES[device]
    out = {"device": device, "device_figures": dev, "efficiency": EFFICIENCY, "arch": arch, "crop": crop,
           "batch": batch}
    for name, fast in (("fast", True), ("reference", False)):
        # the fast trainer's default: the student's three forwards as one call (fast.batched_student)
        ops, n_params = record_step(arch, crop, batch, fast, batched=fast and FastConfig().batched_student)
        out[name] = predict_gpu(ops, dev, fast, n_params)
    # the reference decodes 3 x B full-size PNGs per step with `data_workers` DataLoader workers; the fast trainer
    # reads prepared JPEGs on the GPU (nvJPEG) or on CPU threads, overlapped with the step: not its bottleneck
    data_ms = 1e3 * 3 * batch * EFFICIENCY["png_decode_s"] / max(1, data_workers)
    ref = out["reference"]
    ref["data_ms"] = data_ms
    ref["step_ms"] = max(ref["compute_ms"], data_ms)
    out["fast"]["step_ms"] = out["fast"]["compute_ms"]
    out["predicted_ratio"] = ref["step_ms"] / out["fast"]["step_ms"]
    out["predicted_ratio_compute_only"] = ref["compute_ms"] / out["fast"]["compute_ms"]
    return out


def print_table(r: dict, say: Callable[[str], None] = print) -> None:
    say(f"predicted DSP step, {r['arch']} {r['crop']}x{r['crop']} batch {r['batch']} on {r['device']} "
        f"(assumptions: {r['efficiency']})")
    say(f"{'class':<26}{'fast ms':>9}{'ref ms':>9}{'fast GFLOP':>12}{'fast GB':>9}{'ref GB':>9}{'fast ops':>9}"
        f"{'ref ops':>9}")
    for cls in CLASSES:
        f, q = r["fast"]["per_class"].get(cls), r["reference"]["per_class"].get(cls)
        if f is None and q is None:
            continue
        f = f or {"ms": 0, "gflop": 0, "gbyte": 0, "ops": 0}
        q = q or {"ms": 0, "gbyte": 0, "ops": 0}
        say(f"{cls:<26}{f['ms']:>9.2f}{q['ms']:>9.2f}{f['gflop']:>12.0f}{f['gbyte']:>9.2f}{q['gbyte']:>9.2f}"
            f"{f['ops']:>9d}{q['ops']:>9d}")
    say(f"{'step (compute)':<26}{r['fast']['compute_ms']:>9.2f}{r['reference']['compute_ms']:>9.2f}")
    say(f"reference data loading {r['reference']['data_ms']:.1f} ms/step; predicted step: fast "
        f"{r['fast']['step_ms']:.1f} ms, reference {r['reference']['step_ms']:.1f} ms, ratio "
        f"x{r['predicted_ratio']:.1f} (compute only x{r['predicted_ratio_compute_only']:.1f})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=sorted(DEVICES) + ["cpu"], default="h200")
    p.add_argument("--arch", default="deeplabv2_r101")
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--data-workers", type=int, default=4, help="the reference's DataLoader workers")
    p.add_argument("--compare", action="store_true", help="with --device cpu: predicted vs bench.profile_step")
    p.add_argument("--plan", action="store_true", help="the predicted saving of each remaining change")
    p.add_argument("--steps", type=int, default=5, help="--compare: profiled steps")
    p.add_argument("--threads", type=int, default=0, help="--compare: torch threads (0: torch's default)")
    p.add_argument("--rounds", type=int, default=3, help="--compare: rounds of rates + profiled steps (medians)")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if args.device == "cpu":
        if not args.compare:
            p.error("--device cpu needs --compare (its rates are measured, and checked against a profile)")
        from bench.cost_cpu import compare_main

        return compare_main(args.steps, args.json, args.threads, args.rounds)
    if args.plan:
        from bench.cost_plan import plan_main

        return plan_main(args.device, args.arch, args.crop, args.batch, args.json)
    result = run(args.device, args.arch, args.crop, args.batch, args.data_workers)
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
