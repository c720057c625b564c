#!/usr/bin/env bash
# The CPU kernel (csrc/freeu_cpu.cpp) under AddressSanitizer and UndefinedBehaviorSanitizer.
#
#   bash tools/sanitize_cpu.sh            # short: the cpu-backend tests (about 2 minutes on 2 cores)
#   bash tools/sanitize_cpu.sh --full     # also the property tests and every cpu test of the matrix
#
# Builds the kernel library with -fsanitize=address,undefined (-O1 -g, no recovery: the first report
# aborts the run) into a temporary directory, points $FREEU_KERNELS_CPU_LIB (cpu_backend.ENV_LIBRARY) at
# it and runs the cpu-backend tests with libasan preloaded (python itself is not instrumented, so the
# runtime must be loaded first). Every instruction-set copy the library carries is exercised: the tests
# select each with $FREEU_KERNELS_CPU_ISA. Leak checking is off (the Python interpreter's own allocations
# would drown the report); ASan still catches heap/stack overflows and use-after-free in the kernel,
# UBSan signed overflow, misaligned or out-of-range shifts, and invalid casts.
# FREEU_KERNELS_EXPECT_CPU_KERNEL=1 makes the tests fail if the sanitized library did not load.
# Needs g++ (or $CXX) with libasan/libubsan; exits 0 when clean, non-zero on the first report.
set -euo pipefail
cd "$(dirname "$0")/.."

full=0
[[ "${1:-}" == "--full" ]] && full=1
CXX="${CXX:-g++}"
workdir="$(mktemp -d)"
trap 'rm -rf "$workdir"' EXIT
library="$workdir/libfreeu_kernels_cpu.so"

# The flags of setup.py's host build, with the sanitizers instead of -O3.
"$CXX" -std=c++17 -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all \
  -shared -fPIC -fvisibility=hidden -pthread -fopenmp-simd -Wno-psabi -Icsrc -o "$library" csrc/freeu_cpu.cpp

libasan="$("$CXX" -print-file-name=libasan.so)"
libubsan="$("$CXX" -print-file-name=libubsan.so)"
[[ -f "$libasan" ]] || { echo "no libasan.so for $CXX" >&2; exit 2; }

export FREEU_KERNELS_CPU_LIB="$library" FREEU_KERNELS_EXPECT_CPU_KERNEL=1 TRITON_INTERPRET=1
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:allocator_may_return_null=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
tests=(tests/test_cpu_backend.py tests/test_overhead.py tests/test_properties.py tests/test_reliability.py)
filter="cpu"
if [[ $full == 1 ]]; then
  tests+=(tests/test_fused_concat.py tests/test_variants.py)
fi
echo "sanitized CPU library: $library"
LD_PRELOAD="$libasan:$libubsan" python -m pytest "${tests[@]}" -q -p no:cacheprovider -k "$filter" -x
