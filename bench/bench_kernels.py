"""Microbenchmarks of each kernel against its twin and torch.compile of the twin, at the paper's shapes.

    python -m pytest bench/bench_kernels.py --benchmark-only

Shapes: B=2 images 3x512x512 (soft paste, pixel weight); B=2 features 256x65x65 pooled at 512x512 (MMD); the
inputs and the bytes each case assumes come from bench/kernel_cases.py, shared with the kernel tests.
Every case reports the bytes it assumes and the achieved GB/s (= assumed bytes / best time), and appends a row
to bench/results/kernels_<device>.csv with the git sha, device and versions; on a GPU also the fraction of the
measured copy bandwidth. The assumed bytes are the fused kernel's traffic (its floor): for a twin, which moves
more, the figure is an effective rate, directly comparable across implementations of the same case.
On CPU the Triton kernels are skipped (the interpreter is a correctness tool, not a performance path).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.kernel_cases import (
    C_FEAT,
    LAM,
    PAPER_FEATURES,
    PAPER_PASTE,
    B,
    feature_inputs,
    mmd_rbf_bytes,
    paste_bytes,
    paste_inputs,
    pool_bytes,
    weighted_mmd_bytes,
)
from bench.provenance import append_csv, copy_bandwidth_gbs, environment, timed
from dsp_fast import kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
SIZE = PAPER_FEATURES[3]  # the crop the MMD features are pooled at
IMPLS = ["twin", "compiled_twin", "kernel"]
DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32]
RESULTS_CSV = f"kernels_{DEVICE}.csv"
_compiled: dict[str, Callable] = {}


@pytest.fixture(scope="module")
def copy_gbs() -> float:
    return copy_bandwidth_gbs(DEVICE)


def pick(impl: str, twin: Callable, kernel: Callable, warmup: Callable[[Callable], object]) -> Callable:
    """The callable for `impl`; skips honestly when it cannot run here."""
    if impl == "twin":
        return twin
    if impl == "kernel":
        if not ON_GPU:
            pytest.skip("Triton kernels need a GPU; on CPU only the interpreter runs them (correctness, not speed)")
        return kernel
    key = f"{twin.__module__}.{twin.__name__}"
    if key not in _compiled:
        try:
            fn = torch.compile(twin)
            warmup(fn)  # compilation happens at the first call: not timed
        except Exception as err:  # any compiler failure means "not available here": reported as such
            pytest.skip(f"torch.compile of the twin failed on {DEVICE}: {type(err).__name__}: {str(err)[:200]}")
        _compiled[key] = fn
    return _compiled[key]


def run_case(benchmark, name: str, impl: str, dtype: torch.dtype, fn: Callable[[], object], nbytes: int,
             copy_gbs: float) -> None:
    run = timed(fn, DEVICE)
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
    append_csv(RESULTS_CSV, {**environment(DEVICE), **info})
    print(f"\n{name} [{impl}, {info['dtype']}]: {nbytes / 1e6:.1f} MB assumed, best {best * 1e3:.3f} ms, "
          f"{gbs:.1f} GB/s = {gbs / copy_gbs:.1%} of copy ({copy_gbs:.0f} GB/s)")


# --------------------------------------------------------------------------------------------- soft paste
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_dual_soft_paste(benchmark, copy_gbs, impl, dtype):
    args = (*paste_inputs(*PAPER_PASTE, dtype=dtype, device=DEVICE), LAM)
    fn = pick(impl, kernels.twins.dual_soft_paste, kernels.dual_soft_paste, lambda f: f(*args))
    run_case(benchmark, "dual_soft_paste", impl, dtype, lambda: fn(*args), paste_bytes(*PAPER_PASTE, dtype), copy_gbs)


# ---------------------------------------------------------------------------------------------------- MMD
def feat_inputs(dtype: torch.dtype, grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return feature_inputs(*PAPER_FEATURES, dtype, device=DEVICE, density=0.5, grad=grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_masked_upsample_pool(benchmark, copy_gbs, impl, dtype):
    feat, _, mask = feat_inputs(dtype, grad=False)
    fn = pick(impl, kernels.twins.masked_upsample_pool, kernels.masked_upsample_pool, lambda f: f(feat, mask, SIZE))
    run_case(benchmark, "masked_upsample_pool", impl, dtype, lambda: fn(feat, mask, SIZE), pool_bytes(feat, mask),
             copy_gbs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_weighted_mmd_fwd_bwd(benchmark, copy_gbs, impl, dtype):
    feat_s, feat_t, mask = feat_inputs(dtype, grad=True)

    def step(f: Callable) -> None:
        feat_s.grad = feat_t.grad = None
        f(feat_s, feat_t, mask, SIZE).backward()

    fn = pick(impl, kernels.twins.weighted_mmd, kernels.weighted_mmd, step)
    run_case(benchmark, "weighted_mmd_fwd_bwd", impl, dtype, lambda: step(fn), weighted_mmd_bytes(feat_s, mask),
             copy_gbs)


class _KernelCount(TorchDispatchMode):
    """Counts the ATen ops that launch work (views and detach excluded)."""

    VIEWS = {"unsqueeze", "permute", "view", "detach", "select", "expand", "squeeze", "slice", "transpose", "t",
             "alias", "_unsafe_view", "as_strided", "unbind"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.__name__.split(".")[0] not in self.VIEWS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("impl", ["twin", "fast"])
def test_mmd_rbf_fwd_bwd(benchmark, copy_gbs, impl):
    """The MMD is launch-bound (8 KB in): what matters is how many kernels forward + backward run."""
    fn = kernels.twins.mmd_rbf if impl == "twin" else kernels.mmd_rbf
    x = torch.randn(B, C_FEAT, device=DEVICE, requires_grad=True)
    y = torch.randn(B, C_FEAT, device=DEVICE, requires_grad=True)
    with _KernelCount() as fwd:
        val = fn(x, y)
    with _KernelCount() as bwd:
        val.backward()
    benchmark.extra_info.update({"aten_kernels_forward": fwd.count, "aten_kernels_backward": bwd.count})
    print(f"\nmmd_rbf [{impl}]: {fwd.count} ATen kernels forward, {bwd.count} backward")
    run_case(benchmark, "mmd_rbf_fwd_bwd", impl, torch.float32, lambda: fn(x, y).backward(), mmd_rbf_bytes(x),
             copy_gbs)


def test_copy(benchmark, copy_gbs):
    """The ceiling itself, timed like the cases: a 256 MiB float32 copy (read + write), larger than any cache."""
    src = torch.rand(64 * 2**20, device=DEVICE)
    dst = torch.empty_like(src)
    run_case(benchmark, "copy", "torch", torch.float32, lambda: dst.copy_(src), 2 * src.numel() * 4, copy_gbs)

if os.environ.get("TRITON_INTERPRET") == "1":  # timing the interpreter would be meaningless
    pytest.skip("unset TRITON_INTERPRET to benchmark", allow_module_level=True)
