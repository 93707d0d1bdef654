"""Every Triton kernel specialisation compiles for Hopper (sm_90) and Ampere (sm_80) without a GPU, with no
register spills in what a training step launches: `bench/compile_kernels.py` run as a subprocess (the kernels
must be imported without TRITON_INTERPRET, which conftest sets for this process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="the gpu extra (triton) is not installed")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_step_and_api_kernels_compile_for_sm90_and_sm80(tmp_path):
    out = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # a cold cache: every kernel really goes through ptxas
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "bench.compile_kernels", "--arch", "90", "80",
                           "--json", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_dual_soft_paste_kernel", "_adjoint_linear_kernel", "_stats_kernel", "_stats_finalize_kernel",
                       "_fwd_kernel", "_bwd_reduce_kernel", "_bwd_finalize_kernel", "_bwd_dx_kernel"}
    assert {r["arch"] for r in rows} == {"sm_90", "sm_80"}
    assert all(r["cubin_bytes"] > 0 and r["registers"] > 0 for r in rows)
    # fp16 and bf16 images were compiled too (the api plan)
    assert any("bfloat16" in r["args"] for r in rows) and any("float16" in r["args"] for r in rows)
    spills = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spills, f"register spills: {spills}"
