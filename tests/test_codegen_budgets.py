"""CI's budget check of issue 10: compile the quick codegen cases of both GPU kernels for sm_90, fail on any
violated budget (bench/codegen/budgets.py), listing all of them.

The compiles run once per session in a subprocess (``python -m bench.codegen --quick``, two workers): the
report needs the real Triton JIT, not the interpreter this test run sets with TRITON_INTERPRET=1. A backend
whose compiler is missing here is skipped with the reason (CI has both nvcc and Triton's ptxas).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.codegen import budgets  # noqa: E402
from bench.codegen.cases import quick_cases  # noqa: E402
from bench.codegen.sass import triton_bin_dir  # noqa: E402

# Generous: the quick run takes a few minutes on 2 cores; a hung compiler must not hang CI.
_RUN_TIMEOUT_S = 1200


def _missing_compiler(backend: str):
    """Why this backend cannot be compiled here, or None."""
    if backend == "cuda":
        return None if shutil.which("nvcc") else "nvcc not found on PATH"
    folder = triton_bin_dir()
    if folder is None:
        return "triton is not installed"
    return None if (folder / "ptxas").exists() else f"Triton's ptxas not found in {folder}"


@pytest.fixture(scope="session")
def codegen_rows(tmp_path_factory):
    """results.json rows of ``python -m bench.codegen --quick`` for the backends that can compile here."""
    backends = [backend for backend in ("triton", "cuda") if _missing_compiler(backend) is None]
    if not backends:
        pytest.skip("no GPU compiler here: " + "; ".join(_missing_compiler(b) for b in ("triton", "cuda")))
    out = tmp_path_factory.mktemp("codegen")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "bench.codegen", "--quick", "--out", str(out), "--jobs", "2",
               "--timeout", "600", "--backends", ",".join(backends)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=_RUN_TIMEOUT_S)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    return json.loads((out / "results.json").read_text())["rows"]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_quick_cases_meet_the_issue_10_budgets(backend, codegen_rows):
    reason = _missing_compiler(backend)
    if reason:
        pytest.skip(reason)
    rows = [row for row in codegen_rows if row["backend"] == backend]
    expected = {(case.name, case.dtype) for case in quick_cases()}
    assert {(row["case"], row["dtype"]) for row in rows} == expected
    assert all(row["arch"] == 90 for row in rows)
    violations = budgets.check(rows)
    assert not violations, f"{len(violations)} budget violations:\n" + "\n".join(violations)
