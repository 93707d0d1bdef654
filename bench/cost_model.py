"""A cost model of one DSP step: what each operator class of the fast trainer's step should take on an H100/H200 at
a config (a prediction, not a measurement), the reference trainer's beside it; with --profile, bench.profile_step's
measured device time per class of the same config beside the prediction (bench/gpu_check.sh runs both).

    python -m bench.cost_model [--device h200] [--config gta2cs] [--profile PROFILE.json] [--json OUT] [key=value ...]

How: each trainer's step is recorded as bench.memory runs it on fake tensors (shapes only, seconds on a CPU) by
`Counter`, with every operator's FLOPs (torch.utils.flop_counter's formulas) and bytes read and written. Each operator
takes max(FLOPs / (matrix rate x efficiency), bytes / (bandwidth x efficiency)) plus a launch (convolutions and
matmuls at the matrix rate, the rest bandwidth-bound): the fast step replays one CUDA graph (a small cost per
kernel), the reference runs eager (Python, dispatch and launch per operator) with cuDNN's default TF32 convolutions
and takes the slower of its compute and its data loading (PIL PNG decode of the full-size images). The device
figures and efficiencies are assumptions printed with the result (DEVICES, EFFICIENCY). With fast.fused_bn (the
CUDA default) the batch-norm class holds the fused kernels' operators (`dsp_fast::bn_*`), each counted as the one pass
over its tensors it makes, and their small per-channel torch operators; ReLU and the residual add are gone from
the elementwise class (fast.fused_bn=never predicts the unfused step).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from bench.memory import stepper
from bench.provenance import parse_args, result_env, tool_parser, write_result
from dsp_fast.config import Config, load_config

# measured on an H200 (bf16 dense matmul, HBM copy); TF32 and fp32 SIMT rates are the datasheet ratios to bf16
DEVICES = {
    "h200": {"bf16_flops": 790e12, "tf32_flops": 395e12, "fp32_flops": 60e12, "hbm_bytes_per_s": 4.3e12},
    "h100": {"bf16_flops": 790e12, "tf32_flops": 395e12, "fp32_flops": 60e12, "hbm_bytes_per_s": 3.35e12},
}
EFFICIENCY = {
    "matrix": 0.55,  # cuDNN convolutions of ResNet-101 at batch 2: well below a large square matmul
    "memory": 0.75,  # elementwise and normalisation kernels of a few MB each
    "graph_kernel_s": 2e-6,  # per kernel inside a replayed CUDA graph
    "eager_op_s": 12e-6,  # per operator in eager PyTorch: Python, dispatch and launch, not overlapped at batch 2
    "png_decode_s": 0.030,  # one full-size GTA5/Cityscapes PNG decoded and resized by PIL, one core
}
# operators of dsp_fast.kernels that launch more than one kernel: the fused BN's tile partials, then their
# per-channel combination (kernels/norm_act.py). The partials (1/8 of a bf16 x, written once, read once) are not
# counted in the bytes: an operator's bytes are its inputs and outputs.
KERNEL_LAUNCHES = {"dsp_fast::bn_stats": 2, "dsp_fast::bn_act_bwd_reduce": 2}
CLASSES = ("convolution", "batch norm", "matmul", "elementwise / reduction", "DSP ops", "optimizer + EMA")
MATRIX_OPS = {"convolution", "convolution_backward", "mm", "bmm", "addmm", "baddbmm"}
FREE_OPS = {"detach", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh",
            "_local_scalar_dense", "_unsafe_view"}
WRITE_ONLY = {"copy_", "fill_", "zero_", "uniform_", "normal_", "bernoulli_"}
# kernels that copy a non-contiguous input to a contiguous one inside (ATen's softmax on CPU and CUDA): a copy no
# dispatch mode sees, which a profile of the CPU step found (the class logits are channels_last)
CONTIGUOUS_INSIDE = {"_softmax", "_log_softmax", "_softmax_backward_data", "_log_softmax_backward_data"}


def aten_class(name: str) -> str:
    """The class of an operator: an aten name without 'aten::', or a `dsp_fast::` kernel (bench.profile_step's
    classes too)."""
    if name.startswith("dsp_fast::bn_"):  # fast.fused_bn: BN, its ReLU and the residual add, one pass each
        return "batch norm"
    if name.startswith("dsp_fast::"):
        return "DSP ops"
    if "convolution" in name or name.startswith("conv") or name.startswith("_slow_conv2d"):
        return "convolution"
    if "batch_norm" in name:
        return "batch norm"
    if name in {"mm", "bmm", "addmm", "baddbmm", "matmul"}:
        return "matmul"
    if name.startswith(("_foreach", "_fused_sgd", "_fused_adamw", "_amp_foreach_non_finite")):
        return "optimizer + EMA"
    return "elementwise / reduction"


def _nbytes(t: torch.Tensor) -> float:
    return float(t.numel() * t.element_size())


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
    launches: int = 1


class Counter(TorchDispatchMode):
    """Records each operator's class, FLOPs and bytes moved: the tensors it reads (its inputs) and writes (its
    outputs and the arguments it mutates in place); views and allocations move nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Op] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name, schema = func.overloadpacket.__name__, func._schema
        if func.namespace not in ("aten", "dsp_fast") or name in FREE_OPS or (
                not schema.is_mutable and any(r.alias_info is not None for r in schema.returns)):
            return out  # prim::device and the like, allocations, views: no kernel
        leaves = torch.utils._pytree.tree_leaves
        written = [t for a, v in zip(schema.arguments, args) if a.alias_info is not None and a.alias_info.is_write
                   for t in leaves(v) if isinstance(t, torch.Tensor)]
        ins = [t for t in leaves((args, kwargs)) if isinstance(t, torch.Tensor)
               and not (name in WRITE_ONLY and any(t is w for w in written))]  # copy_ / fill_ read no destination
        outs = written if schema.is_mutable else [t for t in leaves(out) if isinstance(t, torch.Tensor)]
        flops = flop_registry[func.overloadpacket](*args, **kwargs, out_val=out) \
            if func.overloadpacket in flop_registry else 0
        hidden = hidden_copy_bytes(name, args)
        cls = aten_class(f"{func.namespace}::{name}" if func.namespace != "aten" else name)
        launches = KERNEL_LAUNCHES.get(f"{func.namespace}::{name}", 1) + (hidden > 0)
        self.ops.append(Op(name, cls, float(flops), sum(map(_nbytes, ins + outs)) + hidden, launches))
        return out


def record_step(cfg: Config, trainer: str = "fast") -> list[Op]:
    """The operators of one step of `trainer` (fast or reference) as it runs on CUDA, after a warm step."""
    counter = Counter()
    with stepper(cfg, trainer) as s:
        s.step()
        with counter:
            s.step()
    return counter.ops


def predict(ops: list[Op], matrix_flops: float, bytes_per_s: float, launch_s: float) -> dict:
    """ms per class: each operator max(compute, memory) + launches x launch_s."""
    per_class: dict[str, dict] = collections.defaultdict(lambda: {"ops": 0, "gflop": 0.0, "gbyte": 0.0, "ms": 0.0})
    for op in ops:
        compute = op.flops / (matrix_flops * EFFICIENCY["matrix"]) if op.name in MATRIX_OPS else 0.0
        memory = op.bytes / (bytes_per_s * EFFICIENCY["memory"])
        c = per_class[op.cls]
        c["ops"] += op.launches
        c["gflop"] += op.flops / 1e9
        c["gbyte"] += op.bytes / 1e9
        c["ms"] += 1e3 * (max(compute, memory) + op.launches * launch_s)
    return {"per_class": {k: per_class[k] for k in CLASSES if k in per_class},
            "compute_ms": sum(c["ms"] for c in per_class.values())}


def run(cfg: Config, device: str, data_workers: int = 4) -> dict:
    """Both trainers' steps predicted on `device`; the reference's data loading with `data_workers` workers."""
    dev = DEVICES[device]
    fast = predict(record_step(cfg, "fast"), dev["bf16_flops"], dev["hbm_bytes_per_s"], EFFICIENCY["graph_kernel_s"])
    ref = predict(record_step(cfg, "reference"), dev["tf32_flops"], dev["hbm_bytes_per_s"], EFFICIENCY["eager_op_s"])
    # the reference decodes 3 x B full-size PNGs per step in its DataLoader workers; the fast trainer reads prepared
    # JPEGs overlapped with the step: not its bottleneck
    ref["data_ms"] = 1e3 * 3 * cfg.data.batch_size * EFFICIENCY["png_decode_s"] / max(1, data_workers)
    ref["step_ms"] = max(ref["compute_ms"], ref["data_ms"])
    fast["step_ms"] = fast["compute_ms"]
    return {"device": device, "device_figures": dev, "efficiency": EFFICIENCY, "arch": cfg.model.arch,
            "crop": list(cfg.data.crop_size), "batch": cfg.data.batch_size, "fast": fast, "reference": ref,
            "predicted_ratio": ref["step_ms"] / fast["step_ms"],
            "predicted_ratio_compute_only": ref["compute_ms"] / fast["compute_ms"]}


def print_table(r: dict, measured: dict[str, float] | None = None) -> None:
    w, h = r["crop"]
    print(f"predicted DSP step, {r['arch']} {w}x{h} batch {r['batch']} on {r['device']} "
          f"(assumptions: {r['efficiency']})")
    print(f"{'class':<26}{'fast ms':>9}{'ref ms':>9}{'fast GFLOP':>12}{'fast GB':>9}{'ref GB':>9}{'fast ops':>9}"
          f"{'ref ops':>9}" + (f"{'measured':>10}" if measured else ""))
    empty = {"ms": 0.0, "gflop": 0.0, "gbyte": 0.0, "ops": 0}
    for cls in CLASSES:
        f, q = r["fast"]["per_class"].get(cls, empty), r["reference"]["per_class"].get(cls, empty)
        print(f"{cls:<26}{f['ms']:>9.2f}{q['ms']:>9.2f}{f['gflop']:>12.0f}{f['gbyte']:>9.2f}{q['gbyte']:>9.2f}"
              f"{f['ops']:>9d}{q['ops']:>9d}" + (f"{measured.get(cls, 0.0):>10.2f}" if measured else ""))
    print(f"{'step (compute)':<26}{r['fast']['compute_ms']:>9.2f}{r['reference']['compute_ms']:>9.2f}")
    if measured:
        print(f"measured (bench.profile_step): {sum(measured.get(c, 0.0) for c in CLASSES):.2f} ms of operators, "
              f"{measured.get('data wait', 0.0):.2f} ms data wait")
    print(f"reference data loading {r['reference']['data_ms']:.1f} ms/step; predicted step: fast "
          f"{r['fast']['step_ms']:.1f} ms, reference {r['reference']['step_ms']:.1f} ms, ratio "
          f"x{r['predicted_ratio']:.1f} (compute only x{r['predicted_ratio_compute_only']:.1f})")


def main(argv: list[str] | None = None) -> int:
    p = tool_parser("bench.cost_model", __doc__)
    p.add_argument("--device", choices=sorted(DEVICES), default=None,
                   help="default: the profile's GPU where --profile names an H100, else h200")
    p.add_argument("--config", default="gta2cs", help="preset or YAML file (default: gta2cs, the paper's)")
    p.add_argument("--profile", default="", help="bench.profile_step's JSON: its ms per class beside the prediction")
    p.add_argument("--json", default="", help="write the prediction here")
    args = parse_args(p, argv, overrides=True)
    measured, device = None, args.device or "h200"
    if args.profile:
        with open(args.profile) as f:
            prof = json.load(f)
        measured = prof["ms_per_step_by_class"]
        device = args.device or ("h100" if "H100" in prof["env"]["device"] else "h200")
    result = run(load_config(args.config, args.overrides), device)
    print_table(result, measured)
    if args.json:
        write_result(args.json, {"env": result_env("cpu", args.command), **result, "measured_ms_by_class": measured})
    return 0


if __name__ == "__main__":
    sys.exit(main())
