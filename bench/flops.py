"""FLOPs of one DSP step, counted (not estimated) with torch.utils.flop_counter, and a device's measured matmul rate.

    python -m bench.flops [--arch deeplabv2_r101] [--crop 512] [--batch 2] [--device meta]
    python -m bench.flops --table          # parameters and GFLOP per image at 512x512: R101, mit_b0, mit_b5

A DSP step at batch B runs the teacher forward on B target images (no backward) and the student forward and
backward on 3 x B images (source, mixed source, mixed target). Counting one image's forward F and forward+backward
FB gives step FLOPs = B * (F + 3 * FB); source-only runs B * FB. Only matmul-like ops (convolutions, matmuls) are
counted, which is what the device's matrix rate bounds: the MFU denominators use the same convention.

Attention is counted through PyTorch's math backend (two batched matmuls, Q K^T and A V, in the counter's convention
of 2 FLOPs per multiply-add): the CPU flash kernel has no flop formula and would count as zero. On the `meta` device
nothing is computed, only shapes: ResNet-101 or mit_b5 at 512x512 count in seconds on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dsp_fast.config import ModelConfig
from dsp_fast.models import ARCHS, build_model, count_parameters


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """Each requested gradient of a convolution (input, weight) costs what its forward costs:
    2 x batch x output positions x weight elements (the weight of a grouped conv holds only Cin/groups inputs).
    torch 2.13's own formula ignores groups for the weight gradient and counts a depth-wise conv's as dense:
    about C times too much (1.2 TFLOP instead of a few GFLOP for mit_b0's decoder at 512x512)."""
    positions = x_shape if transposed else grad_out_shape
    forward = 2 * positions[0] * math.prod(positions[2:]) * math.prod(w_shape)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


_FIXES = {torch.ops.aten.convolution_backward: _conv_backward_flop}


def image_flops(arch: str, crop: int, num_classes: int = 19, device: str = "cpu",
                model_cfg: ModelConfig | None = None) -> dict[str, float]:
    """Forward and forward+backward FLOPs of the student for one crop x crop image (batch statistics BN), and its
    parameter count. `model_cfg` (its weights file ignored) overrides arch/num_classes, e.g. a decoder_dim."""
    cfg = (dataclasses.replace(model_cfg, pretrained="") if model_cfg
           else ModelConfig(arch=arch, num_classes=num_classes))
    with torch.device(device):  # on meta the weights are never materialised
        model = build_model(cfg).train()
    x = torch.rand(1, 3, crop, crop, device=device)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False, custom_mapping=_FIXES) as fwd:
            logits, feat = model(x)
        forward = fwd.get_total_flops()
        with FlopCounterMode(display=False, custom_mapping=_FIXES) as both:
            logits, feat = model(x)
            (logits.float().mean() + feat.float().mean()).backward()
    return {"forward": float(forward), "forward_backward": float(both.get_total_flops()),
            "parameters": float(count_parameters(model))}


def step_flops(arch: str, crop: int, batch: int, dsp: bool = True, num_classes: int = 19,
               device: str = "cpu") -> dict[str, float]:
    per_image = image_flops(arch, crop, num_classes, device)
    total = batch * (per_image["forward"] + 3 * per_image["forward_backward"]) if dsp \
        else batch * per_image["forward_backward"]
    return {**per_image, "step": total, "batch": batch, "crop": crop, "arch": arch, "dsp": dsp}


def matmul_rate(device: str, dtype: torch.dtype, n: int = 4096, iters: int = 20) -> float:
    """Measured FLOP/s of an n x n x n matmul in `dtype` on `device` (the MFU denominator)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync()
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def model_table(archs: tuple[str, ...] = ("deeplabv2_r101", "mit_b0", "mit_b5"), crop: int = 512) -> str:
    """A markdown table: parameters and counted GFLOP per image (forward; forward + backward) at crop x crop."""
    rows = ["| model | parameters | GFLOP forward | GFLOP forward + backward |", "|---|---|---|---|"]
    for arch in archs:
        f = image_flops(arch, crop, device="meta")
        rows.append(f"| {arch} | {f['parameters'] / 1e6:.1f}M | {f['forward'] / 1e9:.1f} | "
                    f"{f['forward_backward'] / 1e9:.1f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="deeplabv2_r101", choices=ARCHS)
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="meta", help="meta (shapes only, fast), cpu or cuda: the same counts")
    parser.add_argument("--table", action="store_true", help="docs/performance.md's model table (R101, mit_b0, mit_b5)")
    args = parser.parse_args(argv)
    if args.table:
        print(model_table(crop=args.crop))
        return
    print(json.dumps(step_flops(args.arch, args.crop, args.batch, device=args.device), indent=1))


if __name__ == "__main__":
    main()
