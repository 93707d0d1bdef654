"""Compile every Triton kernel specialisation this project launches for a GPU architecture, on a machine without a
GPU, and report registers and spills per thread.

    python -m bench.compile_kernels [--arch 90 80] [--only step] [--json OUT]

A stand-in Triton driver names the target and Triton's JIT compiles without launching (`warmup`), so each public
kernel function, called on CPU tensors, goes through its real launcher and is specialised exactly as for CUDA tensors
of those shapes, strides and dtypes (integer divisibility by 16, pointer alignment, constexprs); Triton's bundled
ptxas (`-v`) reports the cubin's registers and spills. Nothing is launched. Plans: `step` = what one training step
launches (paper shapes, NCHW and channels_last; the fused BN at its largest, layer1's); `api` = the dtypes, layouts
and odd shapes the tests launch. A compile error raises (exit 1) naming the kernel and the arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator

if os.environ.get("TRITON_INTERPRET") == "1":  # must hold before triton.jit runs, i.e. before the kernels import
    raise SystemExit("bench.compile_kernels compiles for a GPU: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from bench.kernel_cases import PAPER_BN, bn_inputs, paste_inputs  # noqa: E402
from dsp_fast import kernels  # noqa: E402
from dsp_fast.kernels import norm_act, soft_paste, upsample_pool  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class StandInDriver:
    """Just enough of a Triton driver for the JIT to specialise and compile: a target, a device, a stream."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def is_active(self) -> bool:
        return True

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


@contextlib.contextmanager
def compiling_for(arch: int, sink: list[dict]) -> Iterator[None]:
    """Route every kernel launch to a compile for `arch` (no launch); each compiled kernel goes to `sink`."""
    real_run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        compiled = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        sink.append({"kernel": self.fn.__name__, "arch": arch, "compiled": compiled,
                     "args": _describe(args, kwargs)})
        return compiled

    driver = triton.runtime.driver
    saved_driver = driver._active  # None here: no GPU, and reset_active() would fail looking for one
    driver.set_active(StandInDriver(arch))
    JITFunction.run = compile_only
    kernels.set_value_checks(False)  # as on CUDA; nothing is launched, so there is nothing to check
    try:
        with kernels.force_kernels():  # CPU tensors take the Triton path, as CUDA tensors do
            yield
    finally:
        JITFunction.run = real_run
        driver._active = saved_driver
        for k in _jit_kernels():
            k.device_caches.clear()  # the next arch specialises afresh


def _jit_kernels() -> list[JITFunction]:
    return [v for m in (soft_paste, upsample_pool, norm_act) for v in vars(m).values() if isinstance(v, JITFunction)]


def _describe(args: tuple, kwargs: dict) -> str:
    parts = [f"{t.dtype}{list(t.shape)}" if isinstance(t, torch.Tensor) else repr(t) for t in args]
    return ", ".join(parts + [f"{k}={v}" for k, v in kwargs.items()])


def ptxas_usage(ptx: str, arch: int) -> dict[str, int]:
    """Registers and spill bytes per thread, from Triton's bundled ptxas -v (the same tool that made the cubin)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.devnull],
                             capture_output=True, text=True, stdin=subprocess.DEVNULL)
    log = out.stderr + out.stdout
    if out.returncode:
        raise RuntimeError(f"ptxas -v failed for sm_{arch}:\n{log[-2000:]}")
    regs = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    return {"registers": int(regs.group(1)) if regs else -1, "spill_stores": int(stores.group(1)) if stores else 0,
            "spill_loads": int(loads.group(1)) if loads else 0}


# ------------------------------------------------------------------------------------------------------ plans
def _bn_act_both_ways(shape: tuple[int, int, int, int, int], dtype: torch.dtype, channels_last: bool,
                     residual: bool, relu: bool) -> None:
    """bn_act forward and backward (all four kernels) in training mode, per group as `shape` says."""
    n, c, h, w, group_size = shape
    inp = bn_inputs(n, c, h, w, dtype=dtype, channels_last=channels_last, residual=residual)
    x = inp["x"].requires_grad_()
    y = kernels.bn_act(x, inp["weight"], inp["bias"], inp["running_mean"], inp["running_var"], True,
                       group_size=group_size, residual=inp["residual"], relu=relu)
    y.backward(torch.zeros_like(y))


def step_plan() -> list[Callable[[], object]]:
    """One DSP step's launches at the paper's shapes: B=2, 512x512 crops, 19 classes, stride-8 features 65x65 of
    256 channels, fp32 images (the loader's /255) and int64 labels, NCHW and channels_last. The pixel weight is not
    launched by the step (the loss reads the mask and q directly); the api plan covers it."""
    calls: list[Callable[[], object]] = []
    pasted = torch.zeros(2, 512, 512, dtype=torch.bool)  # the long-tail pixels, which join the mask
    for cl in (False, True):
        calls.append(lambda cl=cl: kernels.dual_soft_paste(*paste_inputs(2, 3, 512, 512, channels_last=cl), 0.9,
                                                           pasted))
        fmt = torch.channels_last if cl else torch.contiguous_format
        feat = torch.zeros(2, 256, 65, 65).contiguous(memory_format=fmt)
        calls.append(lambda f=feat: kernels.weighted_mmd(f, f, torch.zeros(2, 512, 512, dtype=torch.bool),
                                                         (512, 512)))
        # the bottlenecks' BN chains under bf16 autocast (fast.fused_bn): BN + ReLU, BN + add + ReLU, BN alone
        for residual, relu in ((False, True), (True, True), (False, False)):
            calls.append(lambda cl=cl, r=residual, u=relu: _bn_act_both_ways(PAPER_BN, torch.bfloat16, cl, r, u))
    return calls


def api_plan() -> list[Callable[[], object]]:
    """The dtypes, label types, layouts and odd shapes the kernel tests launch."""
    calls: list[Callable[[], object]] = []
    for dt in DTYPES.values():
        for label_dtype in (torch.int64, torch.uint8):
            for cl in (False, True):
                calls.append(lambda dt=dt, ld=label_dtype, cl=cl: kernels.dual_soft_paste(
                    *paste_inputs(2, 3, 17, 33, dtype=dt, label_dtype=ld, channels_last=cl), 0.9))
        calls.append(lambda dt=dt: kernels.dual_soft_paste(*paste_inputs(2, 3, 17, 33, dtype=dt), 0.9,
                                                           torch.zeros(2, 17, 33, dtype=torch.bool)))
        calls.append(lambda dt=dt: kernels.masked_upsample_pool(torch.zeros(2, 5, 7, 9, dtype=dt),
                                                                torch.zeros(2, 33, 49, dtype=torch.bool), (33, 49)))
        calls.append(lambda dt=dt: kernels.masked_upsample_pool(torch.zeros(2, 5, 7, 9, dtype=dt), None, (33, 49)))
        for cl in (False, True):
            calls.append(lambda dt=dt, cl=cl: _bn_act_both_ways((3, 17, 5, 7, 1), dt, cl, True, True))
            calls.append(lambda dt=dt, cl=cl: _bn_act_both_ways((3, 17, 5, 7, 0), dt, cl, False, False))
        calls.append(lambda dt=dt: kernels.weighted_mmd(torch.zeros(2, 8, 7, 9, dtype=dt),
                                                        torch.zeros(2, 8, 7, 9, dtype=dt),
                                                        torch.zeros(2, 33, 49), (33, 49)))
    return calls


PLANS = {"step": step_plan, "api": api_plan}


def compile_all(archs: list[int], plans: list[str]) -> list[dict]:
    """Compile the plans for each arch; returns one row per distinct specialisation with registers and spills."""
    rows: list[dict] = []
    for arch in archs:
        sink: list[dict] = []
        with compiling_for(arch, sink):
            for plan in plans:
                for call in PLANS[plan]():
                    call()
        unique: dict[tuple[str, str], dict] = {}
        for rec in sink:
            unique.setdefault((rec["kernel"], rec["compiled"].hash), rec)
        for rec in unique.values():
            compiled = rec["compiled"]
            rows.append({"kernel": rec["kernel"], "arch": f"sm_{arch}", "args": rec["args"],
                         "num_warps": compiled.metadata.num_warps, "shared_bytes": compiled.metadata.shared,
                         "cubin_bytes": len(compiled.asm["cubin"]), **ptxas_usage(compiled.asm["ptx"], arch)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (90: H100/H200)")
    p.add_argument("--only", choices=sorted(PLANS), nargs="+", default=sorted(PLANS))
    p.add_argument("--json", default="", help="also write the rows here")
    args = p.parse_args(argv)
    rows = compile_all(args.arch, args.only)
    print(f"{'kernel':<32}{'arch':<7}{'warps':>6}{'regs':>6}{'spill st':>9}{'spill ld':>9}{'cubin B':>9}")
    for r in rows:
        print(f"{r['kernel']:<32}{r['arch']:<7}{r['num_warps']:>6}{r['registers']:>6}{r['spill_stores']:>9}"
              f"{r['spill_loads']:>9}{r['cubin_bytes']:>9}")
    spilling = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    print(f"{len(rows)} specialisations compiled for {', '.join(f'sm_{a}' for a in args.arch)}; "
          f"{len(spilling)} spill (triton {triton.__version__})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
