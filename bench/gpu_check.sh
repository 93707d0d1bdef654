#!/usr/bin/env bash
# One-command GPU validation of dsp_fast, within about 6 minutes on one H100:
#   bench/gpu_check.sh [OUT_DIR]          (default bench/results/)
#   bench/gpu_check.sh --dry-run [OUT]    (or DRY_RUN=1): print the commands, run nothing
#
# Steps, in priority order (each under `timeout`, clipped to what is left of the overall budget, and run even when
# an earlier one failed; every exit code goes to OUT/summary.txt, every log to OUT/<step>.log):
#   1. nvidia-smi and the versions
#   2. an editable install without dependencies when dsp_fast.kernels does not import (kernels/ is mapped into
#      the package by setup.py, so PYTHONPATH alone is not enough)
#   3. the GPU tests: compiled Triton kernels against their twins in fp32/fp16/bf16, the graphed step against the
#      eager one (TRITON_INTERPRET=0: conftest would otherwise turn the interpreter on)
#   4. the throughput comparison at the paper's config (DeepLabv2 ResNet-101, 512x512, batch 2 + 2) on generated
#      scenes of GTA5 / Cityscapes file sizes, torch data backend (no DALI on the GPU machine)
#   5. the kernel microbenchmarks (pytest-benchmark JSON)
#   6. the MMD memory comparison, then the data-loading benchmark with --device cuda (torchvision nvJPEG decode)
# Exit status: 0 when every step exited 0, else 1.
set -u

DRY_RUN="${DRY_RUN:-0}"
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
    shift
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$REPO/bench/results}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-345}"  # the whole check; 6 minutes less a margin for start-up and copies
PY="${PYTHON:-python}"
cd "$REPO" || exit 2
if [[ "$DRY_RUN" != "1" ]]; then
    mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
fi
SUMMARY="$OUT/summary.txt"
START=$(date +%s)
FAILED=0
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

if [[ "$DRY_RUN" != "1" ]]; then
    {
        echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) git $(git rev-parse HEAD 2>/dev/null || echo unknown)"
        echo "out $OUT, budget ${BUDGET_S} s"
    } >"$SUMMARY"
fi

# step NAME TIMEOUT_S CMD...: runs CMD under timeout (clipped to the budget left), logs to OUT/NAME.log
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
    echo "=== $name (timeout ${limit}s): $*"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    tail -n 25 "$OUT/$name.log"
    local msg="exit $rc"
    ((rc == 124 || rc == 137)) && msg="exit $rc (timed out after ${limit}s)"
    echo "$name: $msg, $(($(date +%s) - t0)) s" | tee -a "$SUMMARY"
    ((rc != 0)) && FAILED=1
    return 0
}

step nvidia_smi 20 nvidia-smi
step versions 30 "$PY" -c "import torch, triton, sys; print(sys.version); print('torch', torch.__version__, 'cuda', \
torch.version.cuda, torch.cuda.get_device_name()); print('triton', triton.__version__)"
# which of the project's dependencies import (the GPU machine has no network: a missing one explains a failure below)
step modules 30 "$PY" -c "
import importlib
for m in ('numpy', 'PIL', 'yaml', 'tqdm', 'pytest', 'pytest_benchmark', 'torchvision', 'nvidia.dali'):
    try:
        importlib.import_module(m)
        print(m, 'ok')
    except Exception as e:
        print(m, 'MISSING', type(e).__name__, e)
"
if [[ "$DRY_RUN" == "1" ]] || ! "$PY" -c "import dsp_fast.kernels, dsp_fast.pipelines" 2>/dev/null; then
    step install 90 "$PY" -m pip install --no-deps --no-build-isolation -e .
fi
step gpu_tests 75 env TRITON_INTERPRET=0 "$PY" -m pytest tests -q -p no:cacheprovider -k "gpu or cuda or graph or bf16"
step throughput 170 "$PY" -m bench.throughput --config configs/gta2cs.yaml --data paper --paper-images 8 4 \
    --device cuda --data-backend torch --rounds 3 --steps 8 --warmup 2 --scaling 2 --out "$OUT"
step kernel_bench 60 env TRITON_INTERPRET=0 "$PY" -m pytest bench/bench_kernels.py -q -p no:cacheprovider \
    --benchmark-only --benchmark-max-time=0.2 --benchmark-min-rounds=3 --benchmark-json "$OUT/kernels_bench.json"
step mmd_memory 30 "$PY" -m bench.mmd_memory --device cuda
step data_throughput 60 "$PY" -m bench.data_throughput --quick --device cuda --out "$OUT"

if [[ "$DRY_RUN" != "1" ]]; then
    # the two benchmarks that write into bench/results/ by themselves: copied next to the rest
    for f in bench/results/kernels_cuda.csv bench/results/mmd_memory_cuda.json; do
        [[ -f "$f" && "$(cd "$(dirname "$f")" && pwd)" != "$OUT" ]] && cp "$f" "$OUT/"
    done
    echo "total $(($(date +%s) - START)) s, $([[ $FAILED == 0 ]] && echo 'all steps passed' || echo 'some steps FAILED')" \
        | tee -a "$SUMMARY"
fi
exit "$FAILED"
