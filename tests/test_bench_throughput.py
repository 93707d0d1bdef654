"""The throughput comparison in CI size: a CPU smoke run (tiny model, 32x32 crops, 2 warm-up + 2 timed steps,
1 round) writes a JSON with both trainers and the ratio, and a PNG; the GPU check script's steps call tools and flags
that exist."""

from __future__ import annotations

import glob
import json
import os
import shlex
import subprocess
import sys

from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cpu_smoke_run_writes_json_and_chart(synthetic_root, tmp_path):
    # TRITON_INTERPRET=0: the benchmark's honest CPU fast path is the kernels' twins, not the interpreter.
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "bench.throughput", "--smoke", "--crop", "32", "--scaling", "0",
           "--ablations", "channels_last", "amp", "graphs", "--out", str(tmp_path),
           f"data.synthetic_root={synthetic_root}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [path] = glob.glob(str(tmp_path / "throughput_cpu_*_smoke.json"))
    with open(path) as f:
        result = json.load(f)
    for name in ("reference", "fast"):
        t = result["trainers"][name]
        assert t["images_per_s"] > 0 and t["steps_per_s"] > 0
        assert t["data_ms"] >= 0 and t["compute_ms"] > 0
        assert abs(t["data_ms"] + t["compute_ms"] - t["ms_per_step"]) < 1e-6 * t["ms_per_step"] + 1e-9
        assert 0 < t["mfu"] < 1
    assert result["headline"]["fast_over_reference"] > 0
    assert result["flops"]["step"] > 0 and result["flops"]["formula"] == "B * (F + 3 * FB)"
    assert result["matmul_rate"]["dtype"] == "fp32"
    assert result["env"]["git_sha"] and result["env"]["torch"] and "dali" in result["env"]
    by_key = {a["key"]: a for a in result["ablation"]}
    assert by_key["channels_last"]["status"] == "measured" and by_key["channels_last"]["fast_over_variant"] > 0
    assert by_key["amp"]["status"] == "n/a" and by_key["graphs"]["status"] == "n/a"  # CPU: fp32, no graphs
    with Image.open(path[:-5] + ".png") as img:
        assert img.size[0] > 400 and img.size[1] > 200


def test_gpu_check_runs_modules_and_flags_that_exist(tmp_path):
    """Every `-m bench.X` step of the GPU check's dry run names a module that starts and takes every flag the step
    passes: a renamed or deleted tool or flag would otherwise be found only on the GPU machine."""
    script = os.path.join(REPO, "bench", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0
    out = tmp_path / "gpu_out"
    proc = subprocess.run(["bash", script, "--dry-run", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    flags: dict[str, set[str]] = {}
    for line in proc.stdout.splitlines():
        words = shlex.split(line.partition(") ")[2])
        if "-m" in words and words[words.index("-m") + 1].startswith("bench."):
            i = words.index("-m") + 1
            flags.setdefault(words[i], set()).update(w.split("=")[0] for w in words[i + 1:] if w.startswith("--"))
    assert {"bench.compile_kernels", "bench.throughput", "bench.profile_step", "bench.cost_model", "bench.memory",
            "bench.data_throughput"} <= set(flags)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile_kernels refuses the interpreter
    for module, used in flags.items():
        helped = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=120)
        assert helped.returncode == 0, (module, helped.stderr[-2000:])
        assert not [f for f in used if f not in helped.stdout], (module, used)
    assert not out.exists()  # a dry run writes nothing


def test_data_backend_dali_without_dali_is_exit_2():
    """--data-backend dali where DALI does not import: a message naming the flag, exit 2, no traceback."""
    probe = ("import sys; sys.modules['nvidia.dali'] = None\n"
             "from bench.throughput.compare import main\n"
             "sys.exit(main(['--data-backend', 'dali', '--smoke']))\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--data-backend dali" in proc.stderr and "Traceback" not in proc.stderr
