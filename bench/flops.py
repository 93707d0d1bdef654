"""FLOPs of one DSP step, counted (not estimated) with torch.utils.flop_counter, and a device's measured matmul rate.

    python -m bench.flops [--arch deeplabv2_r101] [--crop 512] [--batch 2]

A DSP step at batch B runs the teacher forward on B target images (no backward) and the student forward and
backward on 3 x B images (source, mixed source, mixed target). Counting one image's forward F and forward+backward
FB gives step FLOPs = B * (F + 3 * FB); source-only runs B * FB. Only matmul-like ops (convolutions, matmuls) are
counted, which is what the device's matrix rate bounds: the MFU denominators use the same convention.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from dsp_fast.config import ModelConfig
from dsp_fast.models import build_model


def image_flops(arch: str, crop: int, num_classes: int = 19, device: str = "cpu") -> dict[str, float]:
    """Forward and forward+backward FLOPs of the student for one crop x crop image (batch statistics BN)."""
    model = build_model(ModelConfig(arch=arch, num_classes=num_classes)).to(device).train()
    x = torch.rand(1, 3, crop, crop, device=device)
    with FlopCounterMode(display=False) as fwd:
        logits, feat = model(x)
    forward = fwd.get_total_flops()
    with FlopCounterMode(display=False) as both:
        logits, feat = model(x)
        (logits.float().mean() + feat.float().mean()).backward()
    return {"forward": float(forward), "forward_backward": float(both.get_total_flops())}


def step_flops(arch: str, crop: int, batch: int, dsp: bool = True, num_classes: int = 19) -> dict[str, float]:
    per_image = image_flops(arch, crop, num_classes)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="deeplabv2_r101", choices=["deeplabv2_r101", "tiny"])
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args(argv)
    print(json.dumps(step_flops(args.arch, args.crop, args.batch), indent=1))


if __name__ == "__main__":
    main()
