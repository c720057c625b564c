#!/usr/bin/env bash
# A local check against the lent GPU machine's versions (torch 2.11, Triton 3.6, Python 3.12 there), so
# an API difference shows before device time is spent. Not part of CI (it installs a second environment).
#
#   bash tools/check_versions.sh                  # Triton 3.6.0 (PyPI) + the local torch CPU wheel (2.13.0)
#   FREEU_CHECK_TRITON=3.6.0 FREEU_CHECK_TORCH=2.13.0 bash tools/check_versions.sh
#   FREEU_CHECK_TORCH=2.11.0 bash tools/check_versions.sh   # optional: torch 2.11 itself; from PyPI that is
#                                                            # the CUDA build (several GB with its nvidia-* wheels)
#
# Steps: a fresh venv in a temporary folder; torch and Triton at those versions plus the test tools;
# the package installed (not editable) from a copy of the checkout (tracked and untracked-not-ignored
# files; no kernel library is built: the check is about the Python and Triton code); the versions it
# got; the triton backend's tests through the interpreter (TRITON_INTERPRET=1), run from outside the copy
# so the installed package is the one imported; then, if bench/codegen exists, its quick run for the
# triton backend (Triton 3.6 compiling the kernel for sm_90 on the CPU, with its bundled ptxas).
# Exit status: non-zero if a step failed (the setup steps stop the script; both test steps always run). Set FREEU_CHECK_KEEP=1 to keep the folder.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_VERSION="${FREEU_CHECK_TORCH:-2.13.0}"
TRITON_VERSION="${FREEU_CHECK_TRITON:-3.6.0}"
# Triton 3.6's interpreter turns a loop bound held in a 1-element array into an int with int(array), which
# NumPy 2.4 refuses ("only 0-dimensional arrays can be converted"; Triton 3.9 squeezes first). The GPU
# machine compiles instead of interpreting, so the check pins a NumPy the interpreter of that Triton can
# use; FREEU_CHECK_NUMPY=numpy shows that interpreter incompatibility instead.
NUMPY_SPEC="${FREEU_CHECK_NUMPY:-numpy<2.4}"
WORK="$(mktemp -d -t freeu_check_versions.XXXXXX)"
if [ "${FREEU_CHECK_KEEP:-0}" != 1 ]; then
    trap 'rm -rf "$WORK"' EXIT
fi
VENV="$WORK/venv"
SRC="$WORK/src"
step() { echo "== check_versions: $* (t=${SECONDS}s)"; }

step "venv in $WORK with torch==$TORCH_VERSION triton==$TRITON_VERSION $NUMPY_SPEC"
python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# torch first (as .ci/run does): the local CPU wheel, and no CUDA build pulled in by a later requirement.
"$PY" -m pip install -q "torch==$TORCH_VERSION"
"$PY" -m pip install -q "triton==$TRITON_VERSION" "$NUMPY_SPEC" pytest hypothesis pytest-benchmark setuptools wheel

step "package from a copy of the checkout"
mkdir -p "$SRC"
(cd "$ROOT" && git ls-files --cached --others --exclude-standard | while IFS= read -r f; do [ -e "$f" ] && printf '%s\n' "$f"; done \
    | tar -cf - -T -) | tar -xf - -C "$SRC"
FREEU_KERNELS_SKIP_CPU_BUILD=1 FREEU_KERNELS_SKIP_CUDA_BUILD=1 \
    "$PY" -m pip install -q --no-deps --no-build-isolation "$SRC"

step "versions"
(cd "$WORK" && "$PY" - "$TRITON_VERSION" <<'EOF'
import sys
import torch, triton, freeu_kernels
import numpy
print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "numpy", numpy.__version__,
      "freeu_kernels from", freeu_kernels.__file__)
assert triton.__version__ == sys.argv[1], f"triton {triton.__version__} installed, {sys.argv[1]} asked for"
assert "site-packages" in freeu_kernels.__file__, "the checkout, not the installed package, was imported"
EOF
)

# The last two steps both run whatever the other's result: each shows a different kind of break.
FAILED_STEPS=()
step "triton backend tests through the interpreter"
(cd "$WORK" && TRITON_INTERPRET=1 "$PY" -m pytest -q -p no:cacheprovider --rootdir "$SRC" \
    "$SRC/tests/test_fused_concat.py" "$SRC/tests/test_variants.py" "$SRC/tests/test_errors.py" -k triton) \
    || FAILED_STEPS+=("interpreter tests")

if [ -d "$SRC/bench/codegen" ]; then
    step "bench.codegen --quick --backends triton (sm_90 compile on the CPU)"
    (cd "$SRC" && "$PY" -m bench.codegen --quick --backends triton --out "$WORK/codegen") || FAILED_STEPS+=("codegen")
else
    step "no bench/codegen: codegen run skipped"
fi
if [ "${#FAILED_STEPS[@]}" -gt 0 ]; then
    step "FAILED with torch $TORCH_VERSION, triton $TRITON_VERSION: ${FAILED_STEPS[*]}"
    exit 1
fi
step "all steps passed with torch $TORCH_VERSION, triton $TRITON_VERSION"
