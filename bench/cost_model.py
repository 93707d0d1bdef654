"""A cost model of one DSP step on a GPU, from counted FLOPs and bytes per operator: what the fast trainer should
take on an H100/H200 at the paper's config, and the reference trainer beside it. A prediction, not a measurement.

    python -m bench.cost_model [--device h200] [--arch deeplabv2_r101] [--crop 512] [--batch 2] [--json OUT]

How: the step's parts run on the `meta` device (shapes only, no data, seconds on a CPU) under a dispatch mode that
records every aten operator with its FLOPs (torch.utils.flop_counter's formulas) and the bytes it reads and writes
(input and output tensors; views move nothing). The parts of a DSP step at batch B: the teacher forward on B target
images, the student forward + backward on source, mixed source and mixed target (B each), the weighted MMD, the
soft paste, SGD with momentum and the EMA over the parameters. The fast trainer runs them in bf16 (weights cast by
autocast each forward: the graph disables autocast's cache), channels_last, the MMD as the adjoint (never the
upsampled map), one CUDA graph; the reference in fp32 NCHW (cuDNN's default TF32 for convolutions), the naive MMD,
eager, one Python dispatch and launch per operator, a per-parameter EMA loop.

Each operator takes max(FLOPs / (matrix rate x efficiency), bytes / (HBM bandwidth x efficiency)) plus a per-kernel
overhead; matrix-rate ops are convolutions and matmuls, the rest is bandwidth-bound. The device figures and every
efficiency are assumptions printed with the result (DEVICES, EFFICIENCY below); the matrix rate and HBM bandwidth are
what was measured on an H200 (bf16 ~790 TFLOP/s dense, ~4.3 TB/s). The reference's data loading (PIL PNG decode of
the full-size images) is predicted apart: the step takes the slower of compute and data.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from dsp_fast.config import ModelConfig
from dsp_fast.kernels import set_value_checks, twins
from dsp_fast.kernels.mmd import _weighted_mmd_fused
from dsp_fast.models import build_model

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
CLASSES = ("convolution / matmul", "batch norm", "elementwise / reduction", "optimizer + EMA", "DSP ops")


@dataclasses.dataclass
class Op:
    name: str
    cls: str
    flops: float
    bytes: float


class Counter(TorchDispatchMode):
    """Records each aten operator's class, FLOPs and bytes moved (meta tensors: shapes only)."""

    def __init__(self, part: str) -> None:
        super().__init__()
        self.part = part
        self.ops: list[Op] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        schema = func._schema
        is_view = any(r.alias_info is not None for r in schema.returns) and not schema.is_mutable
        if is_view or name in ("detach", "empty", "empty_like", "zeros_like", "new_empty", "lift_fresh"):
            return out
        ins = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        moved = sum(t.numel() * t.element_size() for t in ins) + (0 if schema.is_mutable else
                                                                   sum(t.numel() * t.element_size() for t in outs))
        flops = flop_registry[func.overloadpacket](*args, **kwargs, out_val=out) \
            if func.overloadpacket in flop_registry else 0
        if name.startswith("_foreach") or name.startswith("_fused_sgd"):
            cls = "optimizer + EMA"
        elif "batch_norm" in name:
            cls = "batch norm"
        elif name in MATRIX_OPS:
            cls = "convolution / matmul"
        else:
            cls = self.part if self.part == "DSP ops" else "elementwise / reduction"
        self.ops.append(Op(name, cls, float(flops), float(moved)))
        return out


@contextlib.contextmanager
def counting(ops: list[Op], part: str) -> Iterator[None]:
    mode = Counter(part)
    with mode:
        yield
    ops.extend(mode.ops)


def step_ops(arch: str, crop: int, batch: int, fast: bool, num_classes: int = 19) -> tuple[list[Op], int]:
    """Every operator of one DSP step (meta tensors), and the number of parameters."""
    dtype = torch.bfloat16 if fast else torch.float32
    fmt = torch.channels_last if fast else torch.contiguous_format
    with torch.device("meta"):
        model = build_model(ModelConfig(arch=arch, num_classes=num_classes)).train()
    model = model.to(dtype=dtype, memory_format=fmt)
    params = [p for p in model.parameters() if p.requires_grad]
    ops: list[Op] = []

    def image_batch() -> torch.Tensor:
        return torch.empty(batch, 3, crop, crop, device="meta", dtype=dtype).contiguous(memory_format=fmt)

    if fast:  # autocast's weight casts, once per forward (the graph disables its cache): 4 forwards
        with counting(ops, "elementwise / reduction"):
            for _ in range(4):
                for p in model.parameters():
                    torch.empty_like(p, dtype=torch.float32).to(dtype)
    with counting(ops, ""), torch.no_grad():
        model(image_batch())  # teacher on the target batch
    feats = []
    for _ in range(3):  # student: source, mixed source, mixed target
        with counting(ops, ""):
            logits, feat = model(image_batch())
            up = F.interpolate(logits, size=(crop, crop), mode="bilinear", align_corners=model.logits_align_corners)
            # the features' gradient (the MMD's, on the mixed images) flows back through the projection too; the
            # source image's projection backward is counted as well (a 1x1 convolution, ~0.1% of a R101 step)
            loss = torch.log_softmax(up.float(), dim=1).mean() + feat.float().mean()
            feats.append(feat)
            loss.backward(retain_graph=True)
    with counting(ops, "DSP ops"):
        mask = torch.empty(batch, crop, crop, dtype=torch.bool, device="meta")
        f_s, f_t = (f.detach().float().requires_grad_() for f in feats[1:])
        if fast:
            mmd = _weighted_mmd_fused(f_s, f_t, mask, (crop, crop), 2.0, 5)
        else:
            mmd = twins.weighted_mmd(f_s, f_t, mask, (crop, crop))
        mmd.backward()
        img = torch.empty(batch, 3, crop, crop, device="meta")
        lab = torch.empty(batch, crop, crop, dtype=torch.int64, device="meta")
        sel = torch.empty(batch, num_classes, dtype=torch.bool, device="meta")
        set_value_checks(False)  # a label check reads values; meta tensors have none
        try:
            twins.dual_soft_paste(img, lab, sel, img, lab, img, lab, 0.9)  # the kernel moves these bytes, once
        finally:
            set_value_checks(True)
    with counting(ops, "optimizer + EMA"), torch.no_grad():
        grads = [torch.empty_like(p) for p in params]
        moms = [torch.empty_like(p) for p in params]
        torch._foreach_add_(grads, params, alpha=5e-4)  # weight decay
        torch._foreach_mul_(moms, 0.9)
        torch._foreach_add_(moms, grads)
        torch._foreach_add_(params, moms, alpha=-1e-3)
        teacher = [torch.empty_like(p) for p in params]
        diffs = torch._foreach_sub(params, teacher)  # the EMA, as dsp_fast.method.ema_update
        torch._foreach_mul_(diffs, 0.01)
        torch._foreach_add_(teacher, diffs)
    return ops, len(params)


def predict(ops: list[Op], dev: dict, fast: bool, n_params: int) -> dict:
    rate = dev["bf16_flops"] if fast else dev["tf32_flops"]
    per_class: dict[str, dict] = collections.defaultdict(lambda: {"ops": 0, "gflop": 0.0, "gbyte": 0.0, "ms": 0.0})
    overhead = EFFICIENCY["graph_kernel_s"] if fast else EFFICIENCY["eager_op_s"]
    for op in ops:
        matrix = op.cls == "convolution / matmul"
        compute = op.flops / (rate * EFFICIENCY["matrix"]) if matrix else 0.0
        memory = op.bytes / (dev["hbm_bytes_per_s"] * EFFICIENCY["memory"])
        # the reference's per-parameter loops: one eager op per parameter where the fast path runs one foreach
        launches = n_params if (not fast and op.name.startswith("_foreach")) else 1
        c = per_class[op.cls]
        c["ops"] += launches
        c["gflop"] += op.flops / 1e9
        c["gbyte"] += op.bytes / 1e9
        c["ms"] += 1e3 * (max(compute, memory) + launches * overhead)
    total = sum(c["ms"] for c in per_class.values())
    return {"per_class": {k: per_class[k] for k in CLASSES if k in per_class}, "compute_ms": total}


def run(device: str, arch: str, crop: int, batch: int, data_workers: int) -> dict:
    dev = DEVICES[device]
    out = {"device": device, "device_figures": dev, "efficiency": EFFICIENCY, "arch": arch, "crop": crop,
           "batch": batch}
    for name, fast in (("fast", True), ("reference", False)):
        ops, n_params = step_ops(arch, crop, batch, fast)
        out[name] = predict(ops, dev, fast, n_params)
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
    say(f"{'class':<26}{'fast ms':>9}{'ref ms':>9}{'fast GFLOP':>12}{'fast GB':>9}{'ref GB':>9}{'ref ops':>9}")
    for cls in CLASSES:
        f, q = r["fast"]["per_class"].get(cls), r["reference"]["per_class"].get(cls)
        if f is None and q is None:
            continue
        f = f or {"ms": 0, "gflop": 0, "gbyte": 0}
        q = q or {"ms": 0, "gbyte": 0, "ops": 0}
        say(f"{cls:<26}{f['ms']:>9.2f}{q['ms']:>9.2f}{f['gflop']:>12.0f}{f['gbyte']:>9.2f}{q['gbyte']:>9.2f}"
            f"{q['ops']:>9d}")
    say(f"{'step (compute)':<26}{r['fast']['compute_ms']:>9.2f}{r['reference']['compute_ms']:>9.2f}")
    say(f"reference data loading {r['reference']['data_ms']:.1f} ms/step; predicted step: fast "
        f"{r['fast']['step_ms']:.1f} ms, reference {r['reference']['step_ms']:.1f} ms, ratio "
        f"x{r['predicted_ratio']:.1f} (compute only x{r['predicted_ratio_compute_only']:.1f})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=sorted(DEVICES), default="h200")
    p.add_argument("--arch", default="deeplabv2_r101")
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--data-workers", type=int, default=4, help="the reference's DataLoader workers")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    result = run(args.device, args.arch, args.crop, args.batch, args.data_workers)
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
