"""tools/gpu_verify.sh on CPU: its dry run writes every stage's JSON lines, and gpu_results.py reads them.

The real script runs only on a lent GPU machine, where a typo costs device time; ``--dry-run`` runs the
same stages here (Triton interpreter, the CUDA kernel's CPU emulator, tiny shapes), so CI catches a broken
stage, a missing key or a wrong flag first. One dry run (about a minute of CPU) serves every test here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
sys.path.insert(0, str(TOOLS))

import gpu_common  # noqa: E402
import gpu_correctness  # noqa: E402
import gpu_results  # noqa: E402

# The order and per-stage limits issue 11 asks for; the whole run must fit 7 minutes.
EXPECTED_STAGES = ["facts_build", "correctness", "op_timing", "memcheck", "racecheck", "pytest_cuda",
                   "pytest_triton", "bench_quick"]
OUT_FILES = ["summary.jsonl", "facts.jsonl", "correctness.jsonl", "op_timing.jsonl", "sanitizer.jsonl",
             "pytest.jsonl", "bench_quick.tar.gz", "gpu_verify.log"]


def read(out: Path, name: str):
    return [json.loads(line) for line in (out / name).read_text().splitlines() if line.strip()]


def _gxx_ok() -> bool:
    gxx = shutil.which("g++")
    if gxx is None:
        return False
    major = subprocess.run([gxx, "-dumpversion"], capture_output=True, text=True).stdout.strip().split(".")[0]
    return major.isdigit() and int(major) >= 12


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One `bash tools/gpu_verify.sh --dry-run`; its $OUT folder and exit status."""
    if not _gxx_ok():
        pytest.skip("the dry run builds the CUDA kernel's CPU emulator: needs g++ >= 12")
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("the dry run runs the triton backend through the interpreter: needs triton")
    out = tmp_path_factory.mktemp("gpu_verify_out")
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    result = subprocess.run(["bash", str(TOOLS / "gpu_verify.sh"), "--dry-run"], env=env, capture_output=True,
                            text=True, timeout=900)
    return out, result


def test_stages_run_in_the_issue_order_within_seven_minutes():
    script = (TOOLS / "gpu_verify.sh").read_text()
    stages = re.findall(r"^stage (\w+) (\d+) ", script, flags=re.M)
    assert [name for name, _ in stages] == EXPECTED_STAGES
    budget = int(re.search(r'BUDGET="\$\{FREEU_VERIFY_BUDGET_S:-(\d+)\}"', script).group(1))
    assert budget <= 420
    # Every stage but the last ("if time is left") gets its whole limit inside the budget.
    assert sum(int(limit) for _, limit in stages[:-1]) <= budget
    assert re.search(r'-m pytest -p pytest_jsonl', script) and not re.search(r"-m pytest[^\n]* -x\b", script)


@pytest.mark.slow
def test_dry_run_passes_every_stage(dry_run):
    out, result = dry_run
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(OUT_FILES)  # the device tool brings back 8 files
    final = {}
    for record in read(out, "summary.jsonl"):
        final[record["stage"]] = record
    assert list(final) == EXPECTED_STAGES
    assert {name: r["status"] for name, r in final.items()} == dict.fromkeys(EXPECTED_STAGES, "ok")


@pytest.mark.slow
def test_dry_run_facts(dry_run):
    out, _ = dry_run
    records = {r["kind"]: r for r in read(out, "facts.jsonl")}
    versions = records["versions"]
    for key in ("date", "python", "torch", "triton", "device", "sms", "l2_bytes", "dry_run"):
        assert key in versions
    assert versions["torch"] == torch.__version__ and versions["dry_run"] is True
    assert records["library"]["load_error"] is None and "triton" in records["library"]["available_backends"]


@pytest.mark.slow
def test_dry_run_checks_every_case_on_both_backends(dry_run):
    out, _ = dry_run
    records = read(out, "correctness.jsonl")
    oracle = [r for r in records if r["kind"] == "oracle"]
    for backend in ("cuda", "triton"):
        checked = {r["case"] for r in oracle if r["backend"] == backend}
        assert checked == {case.name for case in gpu_correctness.CASES}
    for r in oracle:
        assert r["ok"] and r["worst_ratio"] <= 1 and {"max_abs_err", "rtol", "atol", "x_shape"} <= set(r)
    kinds = [r["kind"] for r in records]
    assert kinds.count("graph") == 2 * len(gpu_correctness.GRAPH_CASES) and kinds.count("stream") == 2
    assert all(len(r["replays"]) == len(gpu_correctness.GRAPH_FACTORS) for r in records if r["kind"] == "graph")
    warm = next(r for r in records if r["kind"] == "warmup")
    assert warm["done"] == warm["items"] and not warm["errors"]  # the spawn pool works
    assert records[-1]["kind"] == "summary" and records[-1]["failed"] == 0


@pytest.mark.slow
def test_dry_run_times_every_provider(dry_run):
    out, _ = dry_run
    records = read(out, "op_timing.jsonl")
    assert [r["kind"] for r in records[:2]] == ["meta", "ceiling"] and records[-1]["kind"] == "done"
    overhead = {r["provider"]: r for r in records if r["kind"] == "overhead"}
    assert {"torch.cat", "trivial custom_op", "freeu[triton]", "freeu[triton] via torch.ops"} <= set(overhead)
    assert overhead["trivial custom_op"]["vs_trivial_op"] == 1.0
    assert all(r["host_us"] > 0 for r in overhead.values())
    rows = [r for r in records if r["kind"] == "timing"]
    assert not [r for r in rows if "error" in r]
    providers = {r["provider"] for r in rows}
    assert {"copy", "torch.cat", "reference", "freeu[cuda]", "freeu[triton]"} <= providers
    for r in rows:
        for key in ("shape", "dtype", "mode", "bytes", "median_us", "gbps", "pct_of_copy", "vs_torch_cat",
                    "speedup_vs_reference"):
            assert r[key] is not None, (key, r)


@pytest.mark.slow
def test_dry_run_sanitizer_and_pytest_lines(dry_run):
    out, _ = dry_run
    sanitizer = read(out, "sanitizer.jsonl")
    assert {r["tool"] for r in sanitizer if r["kind"] == "sanitizer"} == {"memcheck", "racecheck"}
    cases = [r for r in sanitizer if r["kind"] == "case"]
    assert {r["backend"] for r in cases} == {"cuda", "triton"} and all(r["ok"] for r in cases)
    tests = read(out, "pytest.jsonl")
    sessions = [r for r in tests if r["kind"] == "session"]
    assert [s["label"] for s in sessions] == ["cuda", "triton"]
    assert any(r["kind"] == "test" and r["label"] == "triton" and r["outcome"] == "passed" for r in tests)
    with tarfile.open(out / "bench_quick.tar.gz") as tar:
        assert "bench_quick/report.md" in tar.getnames()


@pytest.mark.slow
def test_results_folder_from_the_dry_run(dry_run, tmp_path):
    out, _ = dry_run
    dest = gpu_results.write_results(out, tmp_path / "cpu-dry-run")
    report = (dest / "report.md").read_text()
    for heading in ("## Device and versions", "## Stages", "## Correctness", "## Op timing", "## compute-sanitizer",
                    "## Tests on the device", "## python -m bench --quick", "### Per-call overhead"):
        assert heading in report
    assert "not reached" not in report.lower()
    data = json.loads((dest / "results.json").read_text())
    assert set(data) == set(gpu_results.FILES) and data["correctness"]
    assert (dest / "bench_quick" / "report.md").exists()
    assert gpu_results.device_slug(data["facts"]) == "cpu-dry-run"


def test_results_of_a_run_cut_short(tmp_path):
    """A run killed in stage 2: the report says what was not reached; a half-written line is skipped."""
    (tmp_path / "facts.jsonl").write_text(json.dumps(dict(kind="versions", device="NVIDIA H200", dry_run=False)) + "\n")
    (tmp_path / "summary.jsonl").write_text(json.dumps(dict(stage="correctness", status="started", seconds=0,
                                                            limit_s=100)) + "\n")
    (tmp_path / "correctness.jsonl").write_text('{"kind": "oracle", "case": "a", "backend": "cuda", "ok": false, '
                                                '"error": "RuntimeError: x"}\n{"kind": "ora')
    assert gpu_results.device_slug(gpu_results.read_jsonl(tmp_path / "facts.jsonl")) == "nvidia-h200"
    dest = gpu_results.write_results(tmp_path, tmp_path / "res")
    report = (dest / "report.md").read_text()
    assert "| correctness | started |" in report and "| op_timing | not reached |" in report
    assert "The stage did not finish" in report and "RuntimeError: x" in report


def test_oracle_comparison_fails_wrong_and_unwritten_outputs():
    tolerances = gpu_common.tolerance_table()
    x, h = gpu_common.random_inputs((1, 3, 8, 8), 2, torch.float16, "cpu", seed=3)
    ref = gpu_common.oracle(x, h, 1.2, 0.5)
    exact = ref.to(torch.float16)
    assert gpu_common.compare_with_oracle(exact, ref, torch.float16, 0.0, tolerances)["ok"]
    shifted = exact.clone()
    shifted[0, 4, 2, 2] += 0.1  # one skip element off by far more than fp16 rounding
    assert not gpu_common.compare_with_oracle(shifted, ref, torch.float16, 0.0, tolerances)["ok"]
    unwritten = exact.clone()
    unwritten[0, 0, 0, 0] = float("nan")
    check = gpu_common.compare_with_oracle(unwritten, ref, torch.float16, 0.0, tolerances)
    assert not check["ok"] and check["nan"]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_random_inputs_layouts(layout):
    x, h = gpu_common.random_inputs((2, 3, 4, 6), 5, torch.bfloat16, "cpu", layout)
    assert x.shape == (2, 3, 4, 6) and h.shape == (2, 5, 4, 6) and x.dtype == torch.bfloat16
    assert x.is_contiguous() == (layout == "contiguous")
    assert x.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
