"""Microbenchmarks of each kernel against its twin at the paper's shapes, inputs and assumed bytes from
bench/kernel_cases.py (shared with the kernel tests).

    python -m pytest bench/bench_kernels.py --benchmark-only

Every case reports the bytes it assumes and the achieved GB/s (= assumed bytes / best time), and appends a row to
bench/results/kernels_<device>.csv with the git sha, device and versions, with the fraction of the measured copy
bandwidth. The assumed bytes are the fused kernel's traffic (its floor): for a twin, which moves more, the figure is
an effective rate, directly comparable across implementations of the same case. On CPU the Triton kernels are
skipped (the interpreter is a correctness tool, not a performance path).
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Callable

import pytest
import torch

import bench.kernel_cases as kc
from bench.cost_model import Counter
from bench.provenance import RESULTS_DIR, environment, sync
from dsp_fast import kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
SIZE = kc.PAPER_FEATURES[3]  # the crop the MMD features are pooled at
IMPLS = ["twin", "kernel"]
DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32]


@pytest.fixture(scope="module")
def copy_gbs() -> float:
    """Measured device copy bandwidth (bytes read + written per second / 1e9), the best of 10 copies of 256 MiB:
    the ceiling a memory-bound kernel is compared against."""
    src = torch.empty(64 * 2**20, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(11):  # the first copy warms up
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(DEVICE)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


def pick(impl: str, twin: Callable, kernel: Callable) -> Callable:
    if impl == "kernel" and not ON_GPU:
        pytest.skip("Triton kernels need a GPU; on CPU only the interpreter runs them (correctness, not speed)")
    return kernel if impl == "kernel" else twin


def run_case(benchmark, name: str, impl: str, dtype: torch.dtype, fn: Callable[[], object], nbytes: int,
             copy_gbs: float) -> None:
    def run() -> None:  # a wall-clock timer sees the whole kernel
        fn()
        sync(DEVICE)

    rounds, warmup = (30, 3) if ON_GPU else (3, 1)  # CPU: few rounds, the twins take seconds at these shapes
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable
        return
    best, mean = benchmark.stats.stats.min, benchmark.stats.stats.mean
    gbs = nbytes / best / 1e9
    info = {"case": name, "impl": impl, "dtype": str(dtype).removeprefix("torch."), "bytes_assumed": nbytes,
            "best_ms": round(best * 1e3, 4), "mean_ms": round(mean * 1e3, 4), "gbs": round(gbs, 2),
            "copy_gbs": round(copy_gbs, 1), "fraction_of_copy": round(gbs / copy_gbs, 3)}
    benchmark.extra_info.update(info)
    row, path = {**environment(DEVICE), **info}, os.path.join(RESULTS_DIR, f"kernels_{DEVICE}.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:  # one row per case; the header when the file is new
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
    print(f"\n{name} [{impl}, {info['dtype']}]: {nbytes / 1e6:.1f} MB assumed, best {best * 1e3:.3f} ms, "
          f"{gbs:.1f} GB/s = {gbs / copy_gbs:.1%} of copy ({copy_gbs:.0f} GB/s)")


# --------------------------------------------------------------------------------------------- soft paste
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_dual_soft_paste(benchmark, copy_gbs, impl, dtype):
    args = (*kc.paste_inputs(*kc.PAPER_PASTE, dtype=dtype, device=DEVICE), kc.LAM)
    fn = pick(impl, kernels.twins.dual_soft_paste, kernels.dual_soft_paste)
    run_case(benchmark, "dual_soft_paste", impl, dtype, lambda: fn(*args), kc.paste_bytes(*kc.PAPER_PASTE, dtype),
             copy_gbs)


# ---------------------------------------------------------------------------------------------------- MMD
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_masked_upsample_pool(benchmark, copy_gbs, impl, dtype):
    feat, _, mask = kc.feature_inputs(*kc.PAPER_FEATURES, dtype, device=DEVICE, density=0.5)
    fn = pick(impl, kernels.twins.masked_upsample_pool, kernels.masked_upsample_pool)
    run_case(benchmark, "masked_upsample_pool", impl, dtype, lambda: fn(feat, mask, SIZE), kc.pool_bytes(feat, mask),
             copy_gbs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_weighted_mmd_fwd_bwd(benchmark, copy_gbs, impl, dtype):
    feat_s, feat_t, mask = kc.feature_inputs(*kc.PAPER_FEATURES, dtype, device=DEVICE, density=0.5, grad=True)

    def step(f: Callable) -> None:
        feat_s.grad = feat_t.grad = None
        f(feat_s, feat_t, mask, SIZE).backward()

    fn = pick(impl, kernels.twins.weighted_mmd, kernels.weighted_mmd)
    run_case(benchmark, "weighted_mmd_fwd_bwd", impl, dtype, lambda: step(fn), kc.weighted_mmd_bytes(feat_s, mask),
             copy_gbs)


@pytest.mark.parametrize("impl", ["twin", "fast"])
def test_mmd_rbf_fwd_bwd(benchmark, copy_gbs, impl):
    """The MMD is launch-bound (8 KB in): what matters is how many kernels forward + backward run."""
    fn = kernels.twins.mmd_rbf if impl == "twin" else kernels.mmd_rbf
    x = torch.randn(kc.B, kc.C_FEAT, device=DEVICE, requires_grad=True)
    y = torch.randn(kc.B, kc.C_FEAT, device=DEVICE, requires_grad=True)
    with Counter() as fwd:
        val = fn(x, y)
    with Counter() as bwd:
        val.backward()
    counts = {"aten_kernels_forward": len(fwd.ops), "aten_kernels_backward": len(bwd.ops)}
    benchmark.extra_info.update(counts)
    print(f"\nmmd_rbf [{impl}]: {counts}")
    run_case(benchmark, "mmd_rbf_fwd_bwd", impl, torch.float32, lambda: fn(x, y).backward(), kc.mmd_rbf_bytes(x),
             copy_gbs)


@pytest.mark.parametrize("impl", ["twin", "fast"])
def test_upsample_bilinear_fwd_bwd(benchmark, copy_gbs, impl):
    """The logits' resize of the CPU step (`synthetic`: 3 x 2 images, 19 classes, 16 x 16 -> 128 x 128,
    channels_last): F.interpolate against the matrix products (on a GPU both run F.interpolate). Assumed bytes:
    fp32 input and output, each read or written once forward and once backward."""
    fn = kernels.twins.upsample_bilinear if impl == "twin" else kernels.upsample_bilinear
    x = torch.randn(6, 19, 16, 16, device=DEVICE).contiguous(memory_format=torch.channels_last).requires_grad_()

    def step() -> None:
        x.grad = None
        fn(x, (128, 128), True).sum().backward()

    nbytes = 2 * 4 * (x.numel() + 6 * 19 * 128 * 128)
    run_case(benchmark, "upsample_bilinear_fwd_bwd", impl, torch.float32, step, nbytes, copy_gbs)


def test_copy(benchmark, copy_gbs):
    """The ceiling itself, timed like the cases: a 256 MiB float32 copy (read + write), larger than any cache."""
    src = torch.rand(64 * 2**20, device=DEVICE)
    dst = torch.empty_like(src)
    run_case(benchmark, "copy", "torch", torch.float32, lambda: dst.copy_(src), 2 * src.numel() * 4, copy_gbs)

if os.environ.get("TRITON_INTERPRET") == "1":  # timing the interpreter would be meaningless
    pytest.skip("unset TRITON_INTERPRET to benchmark", allow_module_level=True)
