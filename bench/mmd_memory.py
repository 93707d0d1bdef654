"""Peak memory of DSP's weighted MMD, forward + backward, at the paper's shapes: the naive twin (upsample to
512x512, multiply, mean) against the fused formulation (adjoint map + one product per feature map), with the
adjoint map built by the Triton kernel (`fused`) or by two interpolation matrices in plain PyTorch
(`adjoint_torch`, what runs where Triton does not).

    python -m bench.mmd_memory [--device cpu|cuda]

Shapes: B=2, features 256x65x65 (float32, requiring grad), mask 2x512x512 bool, crop 512x512: the inputs of
bench/kernel_cases.py, shared with the kernel tests and the microbenchmarks.
Each variant runs in its own process. On CPU the peak is the resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs just before the call) minus the resident set at that moment, so imports and inputs are not
counted; on CUDA it is torch.cuda.max_memory_allocated minus the memory allocated before. Both variants also report
the largest tensor any ATen op returned (forward and backward), which for the fused one must stay far below
B*256*512*512. On CPU the fused variant's adjoint-map kernel runs in the Triton interpreter (TRITON_INTERPRET=1);
its numpy buffers are mask-sized and counted in the peak. Writes bench/results/mmd_memory_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bench.kernel_cases import MEMORY_WARMUP, PAPER_FEATURES, feature_inputs, upsampled_bytes

B, C, (H_FEAT, W_FEAT), (H, W) = PAPER_FEATURES
VARIANTS = ("naive", "fused", "adjoint_torch")
MIB = 2**20


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(variant: str, device: str) -> dict:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from dsp_fast import kernels

    fn = kernels.twins.weighted_mmd if variant == "naive" else kernels.weighted_mmd
    if variant == "adjoint_torch":  # the plain-PyTorch adjoint, even where the Triton kernel could run
        kernels.upsample_pool.use_triton = lambda t: False

    class LargestTensor(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    def make(b, c, hw, size):
        return feature_inputs(b, c, hw, size, device=device, density=0.5, grad=True,
                              gen=torch.Generator().manual_seed(0))

    def step(feat_s, feat_t, mask):
        loss = fn(feat_s, feat_t, mask, tuple(mask.shape[-2:]))
        loss.backward()
        return loss.detach()

    step(*make(*MEMORY_WARMUP))  # warm up: lazy imports, kernel compilation, allocator pools
    feat_s, feat_t, mask = make(*PAPER_FEATURES)
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = step(feat_s, feat_t, mask)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        method = "torch.cuda.max_memory_allocated - memory_allocated before"
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        before = _proc_status_kib("VmRSS")
        loss = step(feat_s, feat_t, mask)
        peak = (_proc_status_kib("VmHWM") - before) * 1024
        method = "VmHWM after - VmRSS before (VmHWM reset via /proc/self/clear_refs)"
    grads = (feat_s.grad.clone(), feat_t.grad.clone())
    feat_s.grad = feat_t.grad = None
    with LargestTensor() as probe:
        step(feat_s, feat_t, mask)
    return {"variant": variant, "peak_bytes": peak, "peak_mib": round(peak / MIB, 1), "method": method,
            "largest_tensor_numel": probe.numel, "loss": float(loss),
            "grad_norms": [float(g.norm()) for g in grads]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.child:
        print(json.dumps(child(args.child, device)))
        return

    from bench._env import RESULTS_DIR, environment

    results = {}
    for variant in VARIANTS:
        env = dict(os.environ)
        if device == "cpu" and variant == "fused":
            env["TRITON_INTERPRET"] = "1"  # the adjoint-map kernel has no other way to run on CPU
        else:
            env.pop("TRITON_INTERPRET", None)
        out = subprocess.run([sys.executable, "-m", "bench.mmd_memory", "--child", variant, "--device", device],
                             env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    full_numel = B * C * H * W
    report = {
        **environment(device),
        "command": "python -m bench.mmd_memory" + (f" --device {args.device}" if args.device else ""),
        "shapes": {"feat": [B, C, H_FEAT, W_FEAT], "mask": [B, H, W], "dtype": "float32"},
        "upsampled_tensor_bytes": upsampled_bytes(B, C, (H, W)),
        **results,
        "peak_ratio_naive_over_fused": round(results["naive"]["peak_bytes"] / max(results["fused"]["peak_bytes"], 1),
                                             1),
        "peak_ratio_naive_over_adjoint_torch": round(
            results["naive"]["peak_bytes"] / max(results["adjoint_torch"]["peak_bytes"], 1), 1),
        "fused_builds_full_resolution_tensor": results["fused"]["largest_tensor_numel"] >= full_numel,
        "adjoint_torch_builds_full_resolution_tensor": results["adjoint_torch"]["largest_tensor_numel"] >= full_numel,
        "loss_abs_diff": abs(results["naive"]["loss"] - results["fused"]["loss"]),
        "loss_abs_diff_adjoint_torch": abs(results["naive"]["loss"] - results["adjoint_torch"]["loss"]),
    }
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"mmd_memory_{device}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"weighted MMD forward + backward, B={B}, {C}x{H_FEAT}x{W_FEAT} -> {H}x{W}, float32, on {device}:")
    print(f"  one upsampled tensor (B*{C}*{H}*{W} float32): {full_numel * 4 / MIB:.0f} MiB")
    for variant in VARIANTS:
        r = results[variant]
        print(f"  {variant:13s}: peak {r['peak_mib']:8.1f} MiB, largest tensor {r['largest_tensor_numel']:>10d} "
              f"elements, loss {r['loss']:.6f}")
    print(f"  naive / fused peak: {report['peak_ratio_naive_over_fused']}x, naive / adjoint_torch peak: "
          f"{report['peak_ratio_naive_over_adjoint_torch']}x; written to {path}")


if __name__ == "__main__":
    main()
