#!/usr/bin/env bash
# Compiles every .cu under csrc/ for sm_80 and sm_90 with `-Xptxas -v` and fails (exit 1) on a compile
# error, a register spill, or a header that needs a CUDA build of torch. Needs only nvcc (no GPU, no torch).
#
#   bash csrc/check_compile.sh            # both architectures, in parallel
#   ARCHS="90" bash csrc/check_compile.sh # a subset
#   NVCC=/path/to/nvcc bash csrc/check_compile.sh
set -u -o pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nvcc_bin="${NVCC:-nvcc}"
archs="${ARCHS:-80 90}"
if ! command -v "$nvcc_bin" >/dev/null 2>&1; then
    echo "check_compile: nvcc not found (set NVCC or PATH)" >&2
    exit 2
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

status=0
shopt -s nullglob globstar
sources=("$here"/**/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
    echo "check_compile: no .cu files under $here" >&2
    exit 1
fi

# The library must stay torch-version independent: no header that needs a CUDA build of torch.
for src in "${sources[@]}"; do
    if grep -nE '#include *[<"](torch/extension\.h|c10/cuda/|ATen/cuda/|torch/csrc/)' "$src"; then
        echo "FAIL $src includes a header that needs a CUDA build of torch" >&2
        status=1
    fi
done

echo "$("$nvcc_bin" --version | tail -1)"
pids=()
for src in "${sources[@]}"; do
    for arch in $archs; do
        name="$(basename "$src" .cu)_sm${arch}"
        (
            "$nvcc_bin" -std=c++17 -O3 -Xcompiler -fPIC -Xcompiler -Wall -Xptxas -v \
                -gencode "arch=compute_${arch},code=sm_${arch}" -I"$here" \
                -c "$src" -o "$work/$name.o" >"$work/$name.log" 2>&1
            echo $? >"$work/$name.rc"
        ) &
        pids+=($!)
    done
done
for pid in "${pids[@]}"; do wait "$pid"; done

printf '%-44s %-6s %5s %6s %12s %s\n' "kernel" "arch" "regs" "stack" "spill(st/ld)" "result"
for src in "${sources[@]}"; do
    for arch in $archs; do
        name="$(basename "$src" .cu)_sm${arch}"
        rc="$(cat "$work/$name.rc" 2>/dev/null || echo 1)"
        if [ "$rc" != "0" ]; then
            echo "FAIL $(basename "$src") sm_${arch}: nvcc exit $rc"
            sed 's/^/    /' "$work/$name.log" | head -40
            status=1
            continue
        fi
        # ptxas prints, per entry: "Compiling entry function 'NAME' for 'sm_XX'", then
        # "N bytes stack frame, S bytes spill stores, L bytes spill loads", then "Used R registers".
        awk -v arch="sm_${arch}" '
            /Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); fn = substr($0, RSTART + 1, RLENGTH - 2) }
            /bytes stack frame/ { stack = $1; st = $5; ld = $9 }
            /Used [0-9]+ registers/ {
                for (i = 1; i <= NF; i++) if ($i == "Used") regs = $(i + 1)
                short = fn; if (match(fn, /kernelI[^E]*E/)) short = "freeu_fused_concat_kernel<" substr(fn, RSTART + 7, RLENGTH - 8) ">"
                verdict = (st + 0 > 0 || ld + 0 > 0) ? "SPILL" : "ok"
                printf "%-44s %-6s %5s %6s %12s %s\n", short, arch, regs, stack, st "/" ld, verdict
            }' "$work/$name.log" | tee "$work/$name.summary"
        if grep -q "SPILL" "$work/$name.summary"; then status=1; fi
        if ! grep -q "Used" "$work/$name.log"; then
            echo "FAIL $(basename "$src") sm_${arch}: no ptxas report (no kernel compiled?)"
            status=1
        fi
        if grep -qiE "warning" "$work/$name.log"; then
            echo "warnings from $(basename "$src") sm_${arch}:"
            grep -iE "warning" "$work/$name.log" | sed 's/^/    /' | head -20
        fi
    done
done

if [ "$status" -eq 0 ]; then
    echo "check_compile: OK (${#sources[@]} file(s), archs: $archs, no spills)"
else
    echo "check_compile: FAILED"
fi
exit "$status"
