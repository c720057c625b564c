#!/usr/bin/env bash
# The GPU verification in one call on a lent GPU machine (H100/H200; torch, Triton, nvcc and
# compute-sanitizer there; nothing fetched from outside): the key evidence first, each stage with its
# own time limit, every stage appending JSON lines to $OUT as it goes.
#
#   bash tools/gpu_verify.sh             # on the GPU machine, from anywhere; results in $OUT (default /tmp/freeu_gpu_verify)
#   bash tools/gpu_verify.sh --dry-run   # on CPU (CI: tests/test_gpu_verify.py): the same stages on the Triton
#                                        # interpreter and the CUDA kernel's CPU emulator, tiny shapes, ~1 minute
#   python tools/gpu_results.py $OUT     # afterwards, on the development machine: bench/results/<device>/
#
# Stages, in this order (limit in seconds, each shrunk to what the total budget has left; a stage with
# under 15 s left is skipped; a failed stage never stops the next one):
#   1 facts_build    60  versions and device facts (facts.jsonl), then the CUDA library alone (the GPU's
#                        architecture; the CPU library is skipped) and what it reports
#   2 correctness   100  cuda + triton vs the float64 oracle, graphs, streams (correctness.jsonl)
#   3 op_timing      75  cuda, triton vs torch.cat, copy, the FFT reference; memory; per-call overhead (op_timing.jsonl)
#   4 memcheck       50  compute-sanitizer memcheck, small shapes, both backends (sanitizer.jsonl)
#     racecheck      25  compute-sanitizer racecheck, the CUDA kernel
#   5 pytest_cuda    45  the GPU tests and the cuda part of the test matrix, --timeout per test, no -x
#     pytest_triton  60  the triton part of the test matrix (pytest-xdist workers compile in parallel)
#   6 bench_quick  rest  python -m bench --quick (--no-unet without diffusers) -> bench_quick.tar.gz
# Total budget: $FREEU_VERIFY_BUDGET_S (default 420 s = 7 minutes), so a rerun fits on a warm machine.
#
# Files in $OUT (8, flat: what the device tool brings back): summary.jsonl (one line when each stage
# starts and one when it ends: stage, status ok/FAILED/timeout/skipped, seconds, limit), facts.jsonl,
# correctness.jsonl, op_timing.jsonl, sanitizer.jsonl, pytest.jsonl, bench_quick.tar.gz, gpu_verify.log
# (all output). Exit status 0 when every stage is ok.
set -u -o pipefail
export PYTHONUNBUFFERED=1

DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "gpu_verify.sh: unknown argument $arg (only --dry-run)" >&2; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# The checkout's freeu_kernels (built in place, not installed there) and tools/ (pytest_jsonl plugin).
export PYTHONPATH="$ROOT:$ROOT/tools${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/freeu_gpu_verify}"
mkdir -p "$OUT"
LOG="$OUT/gpu_verify.log"
SUMMARY="$OUT/summary.jsonl"
for f in gpu_verify.log summary.jsonl facts.jsonl correctness.jsonl op_timing.jsonl sanitizer.jsonl pytest.jsonl; do
    : >"$OUT/$f"
done
rm -f "$OUT/bench_quick.tar.gz"
PY="${PYTHON:-python3}"
START=$(date +%s)
BUDGET="${FREEU_VERIFY_BUDGET_S:-420}"
# The dry run compiles the emulator and interprets Triton on a CPU that other jobs may share: its stages get
# FREEU_VERIFY_LIMIT_SCALE (default 4) times the GPU run's limits, so a slow machine does not cut them short.
LIMIT_SCALE=1
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
DRY_FLAG=""
if [ "$DRY_RUN" = 1 ]; then
    DRY_FLAG="--dry-run"
    export FREEU_VERIFY_DRY_RUN=1 TRITON_INTERPRET=1
    export FREEU_VERIFY_EMULATOR="$SCRATCH/libfreeu_emu.so"
    LIMIT_SCALE="${FREEU_VERIFY_LIMIT_SCALE:-4}"
    BUDGET=$((BUDGET * LIMIT_SCALE))
fi

log() { echo "$*" | tee -a "$LOG"; }
elapsed() { echo $(($(date +%s) - START)); }
# summary_line STAGE STATUS SECONDS LIMIT NOTE: one JSON line (the note is ours: no quotes or backslashes).
summary_line() {
    printf '{"stage": "%s", "status": "%s", "seconds": %s, "limit_s": %s, "t_end_s": %s, "dry_run": %s, "note": "%s"}\n' \
        "$1" "$2" "$3" "$4" "$(elapsed)" "$([ "$DRY_RUN" = 1 ] && echo true || echo false)" "${5:-}" >>"$SUMMARY"
    printf '%-14s %-8s %4ss / %4ss  %s\n' "$1" "$2" "$3" "$4" "${5:-}" | tee -a "$LOG"
}

# stage NAME LIMIT COMMAND...: COMMAND under a time limit (shrunk to what the budget has left), its
# output appended to the log. Never exits the script.
stage() {
    local name="$1" limit=$(($2 * LIMIT_SCALE))
    shift 2
    local left=$((BUDGET - $(elapsed)))
    if [ "$left" -lt 15 ]; then
        summary_line "$name" skipped 0 0 "time budget spent"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit="$left"
    log ""
    log "===== $name (limit ${limit}s, t=$(elapsed)s) ====="
    summary_line "$name" started 0 "$limit"
    local t0
    t0=$(date +%s)
    STAGE_LIMIT="$limit" timeout --signal=TERM --kill-after=5 "$limit" bash -c '"$@"' stage "$@" >>"$LOG" 2>&1
    local rc=$?
    local dt=$(($(date +%s) - t0))
    if [ "$rc" -eq 0 ]; then
        summary_line "$name" ok "$dt" "$limit"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        summary_line "$name" timeout "$dt" "$limit" "killed at its limit: the JSON lines written so far stand"
    else
        summary_line "$name" FAILED "$dt" "$limit" "exit $rc"
    fi
    return 0
}

# ---------------------------------------------------------------------------------------------------- 1
facts_build() {
    "$PY" tools/gpu_facts.py versions --out "$OUT/facts.jsonl" $DRY_FLAG || return 1
    if [ "$DRY_RUN" = 1 ]; then
        # setup.py's real invocation (here it builds nothing: CPU build skipped, torch is CPU-only), then the
        # CUDA kernel's CPU emulator that stands in for the GPU library (as tests/test_cuda_backend.py builds it).
        env -u FREEU_KERNELS_REQUIRE_CPU_BUILD FREEU_KERNELS_SKIP_CPU_BUILD=1 \
            "$PY" setup.py -q build_ext --inplace -b "$SCRATCH/build" -t "$SCRATCH/build" || return 1
        g++ -std=c++20 -O2 -shared -fPIC -pthread -Wno-unknown-pragmas -o "$FREEU_VERIFY_EMULATOR" \
            csrc/emulate/freeu_emu.cpp || return 1
    else
        # The CUDA library only (the CPU one is not needed here), for the visible GPU's architecture (setup.py
        # reads it through torch: sm_90 on the lent Hopper machines; $FREEU_KERNELS_CUDA_ARCH_LIST overrides).
        env -u FREEU_KERNELS_REQUIRE_CPU_BUILD -u FREEU_KERNELS_SKIP_CUDA_BUILD \
            FREEU_KERNELS_SKIP_CPU_BUILD=1 FREEU_KERNELS_REQUIRE_CUDA_BUILD=1 \
            "$PY" setup.py -q build_ext --inplace -b "$SCRATCH/build" -t "$SCRATCH/build" || return 1
    fi
    "$PY" tools/gpu_facts.py library --out "$OUT/facts.jsonl" $DRY_FLAG
}

# ---------------------------------------------------------------------------------------------------- 2
correctness() {
    "$PY" tools/gpu_correctness.py --out "$OUT/correctness.jsonl" --budget-s $((STAGE_LIMIT - 10)) $DRY_FLAG
}

# ---------------------------------------------------------------------------------------------------- 3
op_timing() {
    "$PY" tools/gpu_op_bench.py --out "$OUT/op_timing.jsonl" $DRY_FLAG
}

# ---------------------------------------------------------------------------------------------------- 4
# sanitize TOOL DRIVER-ARGS...: the driver under compute-sanitizer; its error count as one JSON line.
sanitize() {
    local tool="$1"
    shift
    if [ "$DRY_RUN" = 1 ]; then  # no sanitizer on CPU: the driver alone, so its cases and plumbing run
        "$PY" tools/sanitize_driver.py --out "$OUT/sanitizer.jsonl" --tool-label "$tool (dry run, no sanitizer)" \
            --dry-run "$@"
        local rc=$?
        printf '{"kind": "sanitizer", "tool": "%s", "errors": null, "exit": %s, "note": "dry run: no compute-sanitizer"}\n' \
            "$tool" "$rc" >>"$OUT/sanitizer.jsonl"
        return "$rc"
    fi
    if ! command -v compute-sanitizer >/dev/null; then
        printf '{"kind": "sanitizer", "tool": "%s", "errors": null, "exit": null, "note": "compute-sanitizer not found"}\n' \
            "$tool" >>"$OUT/sanitizer.jsonl"
        return 1
    fi
    local report="$SCRATCH/$tool.txt"
    # No caching allocator: each tensor its own cudaMalloc, so memcheck sees the true bounds. Only the
    # Python process is instrumented (not ptxas, which Triton runs for a kernel the cache lacks).
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --target-processes application-only \
        --error-exitcode 3 --print-limit 20 \
        "$PY" tools/sanitize_driver.py --out "$OUT/sanitizer.jsonl" --tool-label "$tool" "$@" 2>&1 | tee "$report"
    local rc=${PIPESTATUS[0]}
    local errors
    errors=$(grep -o 'ERROR SUMMARY: [0-9]* error' "$report" | tail -1 | grep -o '[0-9][0-9]*')
    printf '{"kind": "sanitizer", "tool": "%s", "errors": %s, "exit": %s}\n' "$tool" "${errors:-null}" "$rc" \
        >>"$OUT/sanitizer.jsonl"
    return "$rc"
}

# ---------------------------------------------------------------------------------------------------- 5
# run_pytest LABEL TIMEOUT_S PYTEST-ARGS...: results as JSON lines (tools/pytest_jsonl.py), -rf lists failures.
run_pytest() {
    local label="$1" per_test="$2"
    shift 2
    local extra=()
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then
        extra+=(--timeout "$per_test")
    else
        echo "pytest-timeout not installed: no per-test timeout"
    fi
    FREEU_VERIFY_PYTEST_JSONL="$OUT/pytest.jsonl" FREEU_VERIFY_PYTEST_PASS="$label" \
        "$PY" -m pytest -p pytest_jsonl -p no:cacheprovider -q -rf "${extra[@]}" "$@"
}

# The test files that run a backend (a string: arrays do not reach the stage's child shell).
GPU_TEST_FILES="tests/test_cuda_backend.py tests/test_fused_concat.py tests/test_variants.py tests/test_errors.py
                tests/test_autograd.py tests/test_properties.py tests/test_compile.py tests/test_fast_path.py"
pytest_cuda() {
    local files
    read -r -d '' -a files <<<"$GPU_TEST_FILES"
    if [ "$DRY_RUN" = 1 ]; then  # every GPU test skips on CPU: this checks collection and the plugin
        run_pytest cuda 60 tests/test_cuda_backend.py -k "gpu"
    else  # the emulator and nvcc compile-check tests are CPU tests (CI runs them)
        run_pytest cuda 60 "${files[@]}" -k "(cuda or gpu) and not emulated and not check_compile"
    fi
}
pytest_triton() {
    if [ "$DRY_RUN" = 1 ]; then
        run_pytest triton 60 tests/test_fused_concat.py -k "test_matches_oracle and triton and square8 and float32"
        return
    fi
    local files workers=()
    read -r -d '' -a files <<<"$GPU_TEST_FILES"
    if "$PY" -c "import xdist" 2>/dev/null; then
        workers=(-n "$(( $(nproc) > 14 ? 12 : $(nproc) ))")  # Triton compiles are CPU-bound: one per worker
    fi
    run_pytest triton 90 "${workers[@]}" "${files[@]:1}" -k "triton"
}

# ---------------------------------------------------------------------------------------------------- 6
bench_quick() {
    # The stage's timeout sends SIGTERM to this whole shell: without a trap bash dies at once, before the
    # tar below packs what python -m bench wrote on its way out (it keeps finished cases on SIGTERM).
    trap 'echo "bench_quick: SIGTERM: packing what was written"' TERM
    if [ ! -f bench/__main__.py ]; then
        echo "no bench/ package: skipped"
        return 0
    fi
    local args=(--quick --out "$SCRATCH/bench_quick")
    if ! "$PY" -c "import diffusers" 2>/dev/null; then
        args+=(--no-unet)  # the U-Net part builds diffusers' UNet2DConditionModel
        echo "diffusers is not installed: U-Net part skipped (--no-unet)"
    fi
    if [ "$DRY_RUN" = 1 ]; then  # one tiny case: the invocation and the archive, not the numbers
        args+=(--device cpu --no-unet --no-crossover --no-overhead --no-plots --dtypes fp32
               --cases '*1280+1280@8x8*' --providers torch.cat,copy)
    else
        args+=(--device cuda)
    fi
    "$PY" -m bench "${args[@]}"
    local rc=$?
    # Whatever was written, also after a failure.
    [ -d "$SCRATCH/bench_quick" ] && tar -czf "$OUT/bench_quick.tar.gz" -C "$SCRATCH" bench_quick
    return "$rc"
}

export PY OUT SCRATCH LOG DRY_RUN DRY_FLAG GPU_TEST_FILES
export -f facts_build correctness op_timing sanitize run_pytest pytest_cuda pytest_triton bench_quick

log "gpu_verify: $(date -u +%FT%TZ) in $ROOT, results in $OUT, budget ${BUDGET}s, dry run: $DRY_RUN"
stage facts_build 60 facts_build
stage correctness 100 correctness
stage op_timing 75 op_timing
stage memcheck 50 sanitize memcheck
stage racecheck 25 sanitize racecheck --quick --backends cuda
stage pytest_cuda 45 pytest_cuda
stage pytest_triton 60 pytest_triton
stage bench_quick 300 bench_quick

log ""
log "===== done (t=$(elapsed)s); stage results in $SUMMARY ====="
grep -q '"status": "\(FAILED\|timeout\)"' "$SUMMARY" && exit 1
exit 0
