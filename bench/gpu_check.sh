#!/usr/bin/env bash
# One-command GPU validation of dsp_fast, about 7 minutes on one H100/H200, so that a rarely lent GPU is not wasted:
#   bench/gpu_check.sh [OUT_DIR]          (default bench/results/gpu_<date>)
#   bench/gpu_check.sh --dry-run [OUT]    (or DRY_RUN=1): print the commands, run nothing
# The numbered steps below run in priority order, each under `timeout`; their limits add up to the budget
# (GPU_CHECK_BUDGET_S, 400 s), each is clipped to what is left, and every step runs even when an earlier one failed.
# Without a C toolchain (Triton's launchers need a C compiler and Python.h) steps 3, 4 and 6 are skipped and the
# throughput runs the twins. At most 8 files land in OUT (only 8 come back from the GPU machine): summary.txt (with
# the prediction lines of 7 and 8), steps.log, throughput_*.json + .png, throughput_*_mitb5.json, kernels_bench.json,
# profile_step_cuda_*.json, data_throughput_*.json. Exit status: 0 when every step exited 0, else 1.
set -u

DRY_RUN="${DRY_RUN:-0}"
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
    shift
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$REPO/bench/results/gpu_$(date -u +%Y%m%d_%H%M%S)}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-400}"
# python3 where `python` is missing (the GPU machine's image may have only one of them)
PY="${PYTHON:-$(command -v python3 || command -v python)}"
cd "$REPO" || exit 2
SHA="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
if [[ "$DRY_RUN" != "1" ]]; then
    mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
fi
SUMMARY="$OUT/summary.txt"
LOG="$OUT/steps.log"
START=$(date +%s)
FAILED=0
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

if [[ "$DRY_RUN" != "1" ]]; then
    {
        echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) git $SHA"
        echo "python $PY, out $OUT, budget ${BUDGET_S} s"
    } >"$SUMMARY"
    : >"$LOG"
fi

# step NAME TIMEOUT_S CMD...: runs CMD under timeout (clipped to the budget left); output appended to steps.log
step() {
    local name="$1" limit="$2"
    shift 2
    local left=$((BUDGET_S - ($(date +%s) - START)))
    ((limit > left)) && limit=$left
    if [[ "$DRY_RUN" == "1" ]]; then
        echo "[dry-run] ($name, timeout ${limit}s) $*"
        return 0
    fi
    if ((limit < 5)); then
        echo "$name: skipped (budget spent)" | tee -a "$SUMMARY"
        FAILED=1
        return 0
    fi
    echo "=== $name (timeout ${limit}s): $*" | tee -a "$LOG"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$OUT/.step.log" 2>&1
    rc=$?
    cat "$OUT/.step.log" >>"$LOG"
    tail -n 20 "$OUT/.step.log"
    rm -f "$OUT/.step.log"
    local msg="exit $rc"
    ((rc == 124 || rc == 137)) && msg="exit $rc (timed out after ${limit}s)"
    echo "$name: $msg, $(($(date +%s) - t0)) s" | tee -a "$SUMMARY"
    ((rc != 0)) && FAILED=1
    return 0
}

skip() {  # skip NAME REASON
    if [[ "$DRY_RUN" == "1" ]]; then
        echo "[dry-run] ($1) skipped when: $2"
    else
        echo "$1: skipped ($2)" | tee -a "$SUMMARY"
    fi
}

# 1. preflight: its table goes into the summary, where it explains any failure below
step preflight 10 "$PY" - <<'EOF'
import importlib.util, os, shutil, sys, sysconfig
def row(ok, blocking, name, detail):
    print(f"{'PASS' if ok else 'FAIL' if blocking else 'WARN':<5}{name:<24}{detail}")
    return ok or not blocking
import torch
ok = row(torch.cuda.is_available(), True, "torch + CUDA", f"torch {torch.__version__}, CUDA {torch.version.cuda}")
ok &= row(importlib.util.find_spec("triton") is not None, True, "triton", sys.executable)
cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
header = os.path.join(sysconfig.get_paths()["include"], "Python.h")
ok &= row(bool(cc) and os.path.exists(header), True, "C compiler + Python.h", f"{cc}; {header}")
import setuptools
wheel = importlib.util.find_spec("wheel") is not None
version = tuple(int("0" + "".join(c for c in v if c.isdigit())) for v in setuptools.__version__.split(".")[:2])
row(version >= (70, 1) or wheel, False, "editable install", f"setuptools {setuptools.__version__}, wheel {wheel}")
sys.exit(0 if ok else 1)
EOF
TOOLCHAIN=1
if [[ "$DRY_RUN" != "1" ]]; then
    sed -n '/^=== preflight/,$p' "$LOG" | grep -E '^(PASS|FAIL|WARN)' >>"$SUMMARY"
    grep -q '^FAIL C compiler' "$LOG" && TOOLCHAIN=0
fi

# 2. dsp_fast importable (kernels/ and pipelines/ are mapped into the package by setup.py: PYTHONPATH is not enough)
WORK="$REPO"
if [[ "$DRY_RUN" == "1" ]] || ! "$PY" -c "import dsp_fast.kernels, dsp_fast.pipelines" 2>/dev/null; then
    if [[ "$DRY_RUN" == "1" ]] || grep -q '^PASS editable install' "$LOG"; then
        step install 20 "$PY" -m pip install --no-deps --no-build-isolation -e .
    else
        # a link farm: the repository's entries, with dsp_fast/ rebuilt to hold kernels/ and pipelines/; the steps
        # then run from there (tests find their files relative to themselves, git through GIT_DIR)
        WORK="$(mktemp -d)"
        for entry in "$REPO"/* "$REPO"/.ci; do [[ "$(basename "$entry")" != dsp_fast ]] && ln -s "$entry" "$WORK/"; done
        mkdir "$WORK/dsp_fast"
        for entry in "$REPO"/dsp_fast/*; do ln -s "$entry" "$WORK/dsp_fast/"; done
        ln -s "$REPO/kernels" "$WORK/dsp_fast/kernels"
        ln -s "$REPO/pipelines" "$WORK/dsp_fast/pipelines"
        export GIT_DIR="$REPO/.git"
        echo "install: link farm at $WORK (no editable install possible)" | tee -a "$SUMMARY"
    fi
fi
cd "$WORK" || exit 2

if ((TOOLCHAIN)); then
    # 3. the kernels through this machine's Triton and ptxas
    step compile_kernels 20 "$PY" -W ignore -m bench.compile_kernels --arch 90 --only step
    # 4. GPU tests (TRITON_INTERPRET=0: conftest would otherwise turn the interpreter on)
    step gpu_tests 60 env TRITON_INTERPRET=0 "$PY" -m pytest tests -q -p no:cacheprovider -x \
        -k "gpu or cuda or graph or bf16"
    THROUGHPUT_KERNELS=(--ablations graphs amp kernels batched_student)
else
    skip compile_kernels "no C compiler or Python.h: Triton cannot build launchers"
    skip gpu_tests "no C compiler or Python.h"
    THROUGHPUT_KERNELS=(--twins --ablations graphs amp batched_student)
fi
# 5. the paper config on generated scenes of GTA5 / Cityscapes sizes (no DALI on the GPU machine)
step throughput 95 "$PY" -m bench.throughput --config gta2cs --data paper --paper-images 8 4 \
    --device cuda --data-backend torch --rounds 3 --steps 8 --warmup 2 --scaling 0 "${THROUGHPUT_KERNELS[@]}" \
    --out "$OUT"
# 5b. the MiT-B5 backbone with DAFormer's recipe, fast vs reference only (JSON only: the file count is capped)
step throughput_mitb5 30 "$PY" -m bench.throughput --config gta2cs_mitb5 --data paper \
    --paper-images 8 4 --device cuda --data-backend torch --rounds 1 --steps 4 --warmup 2 --scaling 0 \
    --ablations - --no-chart --tag mitb5 --out "$OUT"
if ((TOOLCHAIN)); then
    # 6. kernel microbenchmarks, each kernel against its twin
    step kernel_bench 25 env TRITON_INTERPRET=0 "$PY" -m pytest bench/bench_kernels.py -q -p no:cacheprovider \
        --benchmark-only --benchmark-max-time=0.2 --benchmark-min-rounds=3 \
        --benchmark-json "$OUT/kernels_bench.json"
else
    skip kernel_bench "no C compiler or Python.h"
fi
# 7. the cost model's prediction beside the profiled step (eager: a graph's kernels belong to no operator)
step profile_step 30 "$PY" -m bench.profile_step --config gta2cs --fixed-batch --device cuda --steps 5 --warmup 3 \
    --no-chart --out "$OUT"
PROFILE="$(ls "$OUT"/profile_step_cuda_*.json 2>/dev/null | head -n 1)"
# 7b. the same profile with the fused batch norm off (fast.fused_bn; on by default on CUDA): fused against unfused,
# both eager; its JSON stays outside OUT (the 8 files are taken), its title line goes into summary.txt
step profile_unfused_bn 25 "$PY" -m bench.profile_step --config gta2cs --fixed-batch --device cuda --steps 5 \
    --warmup 3 --no-chart --out "${TMPDIR:-/tmp}" fast.fused_bn=never
step cost_model 30 "$PY" -m bench.cost_model --config gta2cs --profile "${PROFILE:-$OUT/profile_step_cuda_DATE.json}"
# 8. the memory prediction beside the measured peaks (no file: the 8 are taken; the lines go into summary.txt); the
# graph's warm-up shortened to 2 steps, which changes no allocation of the captured step
step memory 25 "$PY" -m bench.memory --config gta2cs --measure-cuda fast.graph_warmup=2
# 9. the nvJPEG data path
step data_throughput 30 "$PY" -m bench.data_throughput --quick --device cuda --out "$OUT"

if [[ "$DRY_RUN" != "1" ]]; then
    awk '/^=== /{on = /^=== memory /} on && /^\[memory\]/' "$LOG" >>"$SUMMARY"
    awk '/^=== /{on = /^=== cost_model /} on && !/^=== /' "$LOG" >>"$SUMMARY"
    awk '/^=== /{name = $2} /^fast step, /{print name ": " $0}' "$LOG" >>"$SUMMARY"
    rm -f "$OUT"/*.tmp
    n_files=$(find "$OUT" -maxdepth 1 -type f | wc -l)
    echo "total $(($(date +%s) - START)) s, $n_files files in $OUT, $([[ $FAILED == 0 ]] && echo 'all steps passed' \
        || echo 'some steps FAILED')" | tee -a "$SUMMARY"
fi
exit "$FAILED"
