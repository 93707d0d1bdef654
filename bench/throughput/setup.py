"""What the throughput comparison runs on: the shared config, the data of both trainers, the FLOPs per step it
counts, the device's measured matrix rate (the MFU denominator), and the provenance of the figures. Data: the
config's own (the synthetic preset's generated PNGs, which the fast trainer reads prepared once), or with `paper`
scenes generated at GTA5 / Cityscapes file sizes, which the reference decodes and resizes every step and the fast
trainer reads prepared once by `dsp_fast.prepare` (JPEG q95).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
import time
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench.data_throughput import make_prepared
from bench.provenance import sync
from dsp_fast.config import Config, ModelConfig, load_config
from dsp_fast.models import build_model

LONG_STEPS = 1_000_000  # train.max_steps for the bench: the poly lr stays positive however many steps are timed


def build_config(config: str, overrides: list[str], arch: str | None, crop: int | None, device: str) -> Config:
    extra = [f"train.max_steps={LONG_STEPS}", f"train.device={device}", "train.compare_source_only=false",
             "fast.image_every=0", "fast.tensorboard=false"]
    if arch:
        extra.append(f"model.arch={arch}")
    if crop:
        extra.append(f"data.crop_size=[{crop},{crop}]")
    return load_config(config, [*extra, *overrides])


@contextlib.contextmanager
def paper_data(n_source: int, n_target: int, workers: int) -> Iterator[tuple[list[str], str, str]]:
    """(the config overrides that point both trainers at them, prepared source, prepared target train): paper-size
    scenes generated and prepared in a temp folder that is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="dsp_throughput_paper_") as root:
        gta, cs, src, tgt = make_prepared(root, n_source, n_target, workers)
        yield [f"data.source_root={gta}", f"data.target_root={cs}", "data.source=gta5", "data.source_size=[1280,720]",
               "data.target_size=[1024,512]"], src, tgt


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """Each requested gradient of a convolution (input, weight) costs what its forward costs: 2 x batch x output
    positions x weight elements. torch 2.13's own formula ignores groups for the weight gradient and counts a
    depth-wise conv's as dense: about C times too much (1.2 TFLOP instead of a few GFLOP for mit_b0's decoder)."""
    positions = x_shape if transposed else grad_out_shape
    forward = 2 * positions[0] * math.prod(positions[2:]) * math.prod(w_shape)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def image_flops(model_cfg: ModelConfig, crop: tuple[int, int], device: str = "meta") -> dict[str, float]:
    """Forward and forward + backward FLOPs of the student for one (W, H) crop (batch-statistics BN), counted with
    torch.utils.flop_counter: convolutions and matmuls only, 2 per multiply-add, attention through PyTorch's math
    backend (the CPU flash kernel has no formula). On `meta` nothing is computed: ResNet-101 counts in seconds."""
    with torch.device(device):
        model = build_model(dataclasses.replace(model_cfg, pretrained="")).train()
    x = torch.rand(1, 3, crop[1], crop[0], device=device)
    fix = {torch.ops.aten.convolution_backward: _conv_backward_flop}
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False, custom_mapping=fix) as fwd:
            model(x)
        with FlopCounterMode(display=False, custom_mapping=fix) as both:
            logits, feat = model(x)
            (logits.float().mean() + feat.float().mean()).backward()
    return {"forward": float(fwd.get_total_flops()), "forward_backward": float(both.get_total_flops())}


def step_flops(cfg: Config, device: torch.device) -> dict[str, float | str]:
    """FLOPs of one DSP step, matmul-like operators only: B * (F + 3 * FB) with DSP (teacher forward on B target
    images; student forward + backward on source, mixed source and mixed target), B * FB source-only."""
    b = cfg.data.batch_size
    per = image_flops(cfg.model, cfg.data.crop_size, str(device))
    dsp = cfg.dsp.enabled
    total = b * (per["forward"] + 3 * per["forward_backward"]) if dsp else b * per["forward_backward"]
    return {"forward_per_image": per["forward"], "forward_backward_per_image": per["forward_backward"],
            "step": total, "formula": "B * (F + 3 * FB)" if dsp else "B * FB", "batch": b,
            "crop": list(cfg.data.crop_size), "arch": cfg.model.arch,
            "counted_with": "torch.utils.flop_counter: convolutions and matmuls only; soft paste, augmentation, MMD "
                            "and the optimizer are not counted"}


def matmul_rate(device: str, dtype: torch.dtype, n: int, iters: int) -> float:
    """Measured FLOP/s of an n x n x n matmul in `dtype` on `device`."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def matrix_rate(device: torch.device) -> dict[str, float | str]:
    """The MFU denominator: the measured matmul rate in the compute dtype the fast trainer uses there (bf16 on CUDA,
    fp32 on CPU, where autocast stays off). CPU uses n=1024 so the measurement takes about a second."""
    if device.type == "cuda":
        rate = matmul_rate(str(device), torch.bfloat16, n=8192, iters=20)
        fp32 = matmul_rate(str(device), torch.float32, n=4096, iters=10)
        return {"dtype": "bf16", "flops_per_s": rate, "fp32_flops_per_s": fp32, "matmul_n": 8192}
    return {"dtype": "fp32", "flops_per_s": matmul_rate("cpu", torch.float32, n=1024, iters=10), "matmul_n": 1024}
