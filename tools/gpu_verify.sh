#!/usr/bin/env bash
# One call on a lent GPU machine (H100/H200): versions, build, tests, compute-sanitizer, benchmarks.
#
#   bash tools/gpu_verify.sh            # from the repository root; results under $OUT (default /tmp/freeu_gpu_verify)
#
# Each stage has its own time limit and the script goes on past a failed stage; the summary at the end
# (also $OUT/summary.txt) lists every stage as ok / FAILED / skipped. Total budget about 9 minutes.
# Files written under $OUT (at most 8, flat): summary.txt, gpu_verify.log (everything), pytest.log,
# sanitizer.log, bench_cuda_vs_copy.json, bench.tar.gz.
set -u -o pipefail
export PYTHONUNBUFFERED=1

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's freeu_kernels (built in place)
OUT="${OUT:-/tmp/freeu_gpu_verify}"
mkdir -p "$OUT"
LOG="$OUT/gpu_verify.log"
SUMMARY="$OUT/summary.txt"
: >"$LOG"
: >"$SUMMARY"
PY="${PYTHON:-python3}"
START=$(date +%s)
BUDGET="${FREEU_VERIFY_BUDGET_S:-540}"
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT

log() { echo "$*" | tee -a "$LOG"; }
elapsed() { echo $(($(date +%s) - START)); }
record() { printf '%-22s %-8s %5ss  %s\n' "$1" "$2" "$3" "${4:-}" | tee -a "$SUMMARY" >>"$LOG"; }

# stage NAME LIMIT_S COMMAND...: runs COMMAND with a time limit (shrunk to what the budget has left),
# output appended to the log, result recorded in the summary. Never exits the script.
stage() {
    local name="$1" limit="$2"
    shift 2
    local left=$((BUDGET - $(elapsed)))
    if [ "$left" -lt 15 ]; then
        record "$name" skipped 0 "time budget spent"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit="$left"
    log ""
    log "===== $name (limit ${limit}s, t=$(elapsed)s) ====="
    local t0=$(date +%s)
    # Functions run in a child bash (timeout cannot call a shell function): they are exported below.
    timeout --signal=TERM --kill-after=10 "$limit" bash -c '"$@"' stage "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local dt=$(($(date +%s) - t0))
    if [ "$rc" -eq 0 ]; then
        record "$name" ok "$dt"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        record "$name" FAILED "$dt" "timed out after ${limit}s"
    else
        record "$name" FAILED "$dt" "exit $rc"
    fi
    return 0
}

versions() {
    nvidia-smi || true
    "$PY" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
try:
    import triton; print("triton", triton.__version__)
except Exception as exc:
    print("triton: not importable:", exc)
EOF
    nvcc --version | tail -2
    command -v compute-sanitizer && compute-sanitizer --version | tail -1 || echo "compute-sanitizer not found"
}

build() {
    # sm_90 only: the lent machines are Hopper. Builds freeu_kernels/_lib/libfreeu_kernels_cuda.so in place.
    FREEU_KERNELS_CUDA_ARCH_LIST="${FREEU_KERNELS_CUDA_ARCH_LIST:-9.0}" FREEU_KERNELS_REQUIRE_CUDA_BUILD=1 \
        "$PY" setup.py -q build_ext --inplace || return 1
    "$PY" - <<'EOF'
import ctypes
from freeu_kernels.backends import cuda_backend as cb
print("load_error:", cb.load_error())
lib = cb.load_library(cb.library_path())
for code, name in ((0, "float32"), (1, "float16"), (2, "bfloat16")):
    regs, local, threads = ctypes.c_int32(), ctypes.c_int32(), ctypes.c_int32()
    rc = lib.freeu_kernel_info(code, ctypes.byref(regs), ctypes.byref(local), ctypes.byref(threads))
    print(f"kernel<{name}>: rc={rc} registers={regs.value} local_bytes={local.value} max_threads={threads.value}")
import freeu_kernels
print("available backends:", freeu_kernels.available_backends("cuda"))
assert cb.load_error() is None
EOF
}

run_pytest() {
    # shellcheck disable=SC2086
    "$PY" -m pytest ${FREEU_VERIFY_PYTEST_ARGS:--x -q tests/} 2>&1 | tee "$OUT/pytest.log"
    return "${PIPESTATUS[0]}"
}

sanitize() {
    local tool="$1"
    shift
    if ! command -v compute-sanitizer >/dev/null; then
        echo "compute-sanitizer not found"
        return 1
    fi
    # No caching allocator: each tensor its own allocation, so memcheck sees the true bounds.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 3 \
        "$PY" tools/sanitize_driver.py "$@" 2>&1 | tee -a "$OUT/sanitizer.log"
    return "${PIPESTATUS[0]}"
}

bench_suite() {
    if [ ! -d bench ] || [ ! -f bench/__main__.py ]; then
        echo "no bench/ package: skipped"
        return 0
    fi
    "$PY" -m bench --quick --no-plots --out "$SCRATCH/bench" || return 1
    tar -czf "$OUT/bench.tar.gz" -C "$SCRATCH" bench
}

: >"$OUT/sanitizer.log"
export PY OUT SCRATCH LOG
export -f versions build run_pytest sanitize bench_suite
log "gpu_verify: $(date -u +%FT%TZ) in $ROOT, results in $OUT, budget ${BUDGET}s"
stage versions 30 versions
stage build 150 build
stage pytest 210 run_pytest
stage memcheck 90 sanitize memcheck
stage racecheck 90 sanitize racecheck --quick --backends cuda
stage bench_cuda_vs_copy 90 "$PY" tools/bench_cuda_vs_copy.py --out "$OUT/bench_cuda_vs_copy.json"
stage bench_quick 120 bench_suite

log ""
log "===== summary (t=$(elapsed)s) ====="
cat "$SUMMARY"
grep -q FAILED "$SUMMARY" && exit 1
exit 0
