"""The benchmark harness end to end on tiny cases: files written, columns present, numbers sane (< 60 s)."""

import csv
import json
import os
import signal
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

# bench/ is a folder of the repository, not an installed package: make it importable under plain `pytest`.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import freeu_kernels  # noqa: E402
from freeu_kernels import fused_concat_reference  # noqa: E402
from bench import OUTPUT_FILES, SuiteConfig, run_suite, write_outputs  # noqa: E402
from bench.cli import main as bench_main  # noqa: E402
from bench.cases import Case, CrossoverCase, decoder_concats, op_cases, parse_dtypes  # noqa: E402
from bench.names import (FLOAT_FACTORS, NOT_SUPPORTED, TORCH_CAT, TRIVIAL_OP, VIA_DISPATCHER,  # noqa: E402
                         fused_backend, fused_provider_name, is_fused)
from bench.overhead import OVERHEAD_CASE  # noqa: E402
from bench.report import MET, NOT_MEASURED, NOT_MET, OVERHEAD_LIMIT, _ratio, evaluate_targets  # noqa: E402
from bench.results import COLUMNS, ROWS_LOG, RowLog, add_derived_metrics, result_row  # noqa: E402
from bench.timing import Timing, TimingBudget  # noqa: E402
from bench.unet_configs import MODELS, reduced_config, unet_inputs  # noqa: E402

pytest.importorskip("diffusers")
pytest.importorskip("matplotlib")

TINY = TimingBudget(seconds=0.01, min_reps=3, max_reps=5, warmup=1, rounds=1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_out")
    config = SuiteConfig(
        device="cpu",
        cases=[
            Case((2, 64, 8, 8), (2, 32, 8, 8), torch.float32, ("tiny",)),
            Case((1, 32, 4, 8, 8), (1, 32, 4, 8, 8), torch.bfloat16, ("tiny-video",)),
        ],
        # 48x48 at threshold 9: 18 frequencies per axis, past what the fused kernels hold.
        crossover_cases=[CrossoverCase((1, 16, 48, 48), torch.float32, thresholds=(1, 9), title="tiny")],
        unet_models=("sd15",),
        unet_size="reduced",
        reduced_latent_size=16,
        op_budget=TINY,
        unet_budget=TINY,
        progress=None,
        out=out,
    )
    result = run_suite(config)
    written = write_outputs(result, out)
    return result, out, written


def test_writes_every_file(tiny_run):
    _, out, written = tiny_run
    names = {path.name for path in written}
    assert set(OUTPUT_FILES) <= names
    assert {"op_time.png", "op_gbps.png", "op_memory.png", "unet_overhead.png", "crossover.png"} <= names
    for path in written:
        assert path.exists() and path.stat().st_size > 0


def test_rows_log_holds_every_row_of_a_finished_run(tiny_run):
    result, out, _ = tiny_run
    logged = [json.loads(line) for line in (out / ROWS_LOG).read_text().splitlines()]
    assert logged == json.loads(json.dumps(result.rows, default=str))  # derived columns included
    assert "partial" not in json.loads((out / "results.json").read_text())["settings"]


def test_sigterm_keeps_the_finished_cases(tmp_path, monkeypatch):
    """SIGTERM after the first of two cases: results.jsonl holds that case (on disk before the signal),
    report.md, results.json and results.csv are written from it and say so, and the exit status is 143."""
    out = tmp_path / "out"
    real_add = RowLog.add
    seen_on_disk = []

    def add_then_sigterm(log, section, rows):
        real_add(log, section, rows)
        seen_on_disk.append(len((out / ROWS_LOG).read_text().splitlines()))
        os.kill(os.getpid(), signal.SIGTERM)  # as `timeout` does; the CLI's handler raises at the next bytecode

    monkeypatch.setattr(RowLog, "add", add_then_sigterm)
    status = bench_main(["--device", "cpu", "--dtypes", "fp32", "--batches", "1,2", "--cases", "*1280+1280@8x8*",
                         "--providers", "torch.cat,copy", "--no-unet", "--no-crossover", "--no-overhead",
                         "--out", str(out)])
    assert status == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the CLI's handler is gone again
    logged = [json.loads(line) for line in (out / ROWS_LOG).read_text().splitlines()]
    assert seen_on_disk == [len(logged)] and {row["provider"] for row in logged} == {"torch.cat", "copy"}
    assert {row["x_shape"] for row in logged} == {"(1,1280,8,8)"}
    payload = json.loads((out / "results.json").read_text())
    note = "interrupted after 1 case (SIGTERM): op 1 of 2"
    assert payload["settings"]["partial"] == note
    assert [row["median_us"] for row in payload["rows"]] == [row["median_us"] for row in logged]
    with open(out / "results.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == len(logged)
    report = (out / "report.md").read_text()
    assert f"partial: {note}" in report and "plots skipped: the run was interrupted" in report
    assert not list(out.glob("*.png"))


def test_csv_and_json_have_the_long_format(tiny_run):
    _, out, _ = tiny_run
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and list(rows[0]) == COLUMNS
    for column in ("median_us", "p20_us", "p80_us", "gbps", "pct_of_copy", "vs_torch_cat", "speedup_vs_diffusers",
                   "vs_trivial_op", "peak_extra_bytes", "aten_ops", "default_backend", "device", "isa", "torch",
                   "triton", "cuda", "date", "commit"):
        assert column in rows[0]
    payload = json.loads((out / "results.json").read_text())
    assert payload["columns"] == COLUMNS
    assert {"environment", "settings", "rows", "summary"} <= set(payload)
    assert payload["environment"]["device_type"] == "cpu"


def test_rows_are_measured_and_checked(tiny_run):
    result, _, _ = tiny_run
    op = [r for r in result.rows if r["section"] == "op" and r["median_us"] is not None]
    providers = {r["provider"] for r in op}
    assert {"diffusers", "torch.cat", "copy", "reference", "freeu_kernels[torch]"} <= providers
    for row in op:
        assert 0 < row["p20_us"] <= row["median_us"] <= row["p80_us"]
        assert row["gbps"] > 0 and row["vs_torch_cat"] > 0
        if row["provider"] in ("diffusers", "reference", "freeu_kernels[torch]"):
            assert row["check"] == "ok", row
    assert any(r["section"] == "crossover" and r["threshold"] == 9 for r in result.rows)
    unet = [r for r in result.rows if r["section"] == "unet" and r["median_us"] is not None]
    assert {"none", "diffusers"} <= {r["provider"] for r in unet}
    assert all("reduced" in r["case"] for r in unet)


def test_memory_and_operator_counts(tiny_run):
    """Counted, not timed: torch.cat holds exactly its output and issues one op; copy allocates nothing;
    the fused CPU kernel holds its output alone; diffusers' path holds more than its output."""
    result, _, _ = tiny_run
    for row in (r for r in result.rows if r["section"] == "op" and r["median_us"] is not None):
        output = row["bytes"] // 2
        if row["provider"] == "torch.cat":
            assert row["peak_extra_bytes"] == output and row["aten_ops"] == 1
        elif row["provider"] == "copy":
            assert row["peak_extra_bytes"] == 0
        elif row["provider"] == "freeu_kernels[cpu]":
            assert row["peak_extra_bytes"] == output
        elif row["provider"] == "diffusers":
            assert row["peak_extra_bytes"] > output
    unet = [r for r in result.rows if r["section"] == "unet" and r["mode"] == "eager" and r["median_us"] is not None]
    assert unet and all(r["peak_extra_bytes"] > 0 for r in unet)


def test_default_backend_is_marked(tiny_run):
    result, out, _ = tiny_run
    op = [r for r in result.rows if r["section"] == "op"]
    assert all(r["default_backend"] in freeu_kernels.available_backends("cpu") for r in op)
    report = (out / "report.md").read_text()
    assert "default backend (automatic choice)" in report and "(default)" in report


OVERHEAD_TARGET = f"per-call overhead <= {OVERHEAD_LIMIT:g}x {TRIVIAL_OP} (tiny input)"


def test_overhead_section_compares_with_a_trivial_custom_op(tiny_run):
    """Every backend timed through fused_concat is also timed through torch.ops, the default one with float
    factors too; each ratio is its row's time over the trivial op's, measured in this run."""
    result, out, _ = tiny_run
    rows = {r["provider"]: r for r in result.rows if r["section"] == "overhead" and r["median_us"] is not None}
    assert {TORCH_CAT, TRIVIAL_OP, "freeu_kernels[torch]", fused_provider_name("torch", VIA_DISPATCHER)} <= set(rows)
    wrappers = [name for name in rows if is_fused(name) and name == fused_provider_name(fused_backend(name))]
    assert {fused_provider_name(fused_backend(name), VIA_DISPATCHER) for name in wrappers} <= set(rows)
    default = rows["freeu_kernels[torch]"]["default_backend"]
    assert fused_provider_name(default, FLOAT_FACTORS) in rows
    assert [name for name in rows if name.endswith(FLOAT_FACTORS)] == [fused_provider_name(default, FLOAT_FACTORS)]
    trivial = rows[TRIVIAL_OP]["median_us"]
    for row in rows.values():
        assert row["vs_trivial_op"] == pytest.approx(row["median_us"] / trivial) and row["aten_ops"] >= 1
    report = (out / "report.md").read_text()
    overhead_section = report.split("## Per-call overhead")[1].split("\n## ")[0]
    for name in rows:  # one table row per provider
        assert sum(line.startswith(f"| {name} |") or line.startswith(f"| {name} (default) |")
                   for line in overhead_section.splitlines()) == 1, name


def test_overhead_target_per_backend_from_its_rows(tiny_run):
    """One target line per backend in the overhead section, on the worst of its rows, as stated in report.md."""
    result, out, _ = tiny_run
    rows = [r for r in result.rows if r["section"] == "overhead" and is_fused(r["provider"])]
    targets = [t for t in result.summary["targets"] if t["target"] == OVERHEAD_TARGET]
    backends = sorted({fused_backend(r["provider"]) for r in rows})
    assert sorted(t["provider"] for t in targets) == [fused_provider_name(b) for b in backends]
    report = (out / "report.md").read_text().split("## Targets")[1].split("\n## ")[0]
    for target in targets:
        mine = [r for r in rows if fused_backend(r["provider"]) == fused_backend(target["provider"])]
        worst = max(mine, key=lambda r: r["vs_trivial_op"])
        assert target["measured"].startswith(f"worst {_ratio(worst['vs_trivial_op'])} ({worst['provider']})")
        assert target["verdict"] == (MET if worst["vs_trivial_op"] <= OVERHEAD_LIMIT else NOT_MET)
        assert f"| {OVERHEAD_TARGET} | {target['provider']} | {target['measured']} | {target['verdict']} |" in report


def _overhead_rows(times_us):
    """Overhead-section rows with the given per-call times (microseconds) by provider, ratios derived."""
    rows = [result_row("overhead", OVERHEAD_CASE, name, "eager", Timing(t / 1e6, t / 1e6, t / 1e6, 10, "test"), {})
            for name, t in times_us.items()]
    return add_derived_metrics(rows)


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_overhead_target_takes_the_worst_way_to_call_a_backend(device_type):
    """A backend whose dispatcher path exceeds the limit fails the target even when fused_concat is within;
    without overhead rows, or without the trivial op to compare with, it is not measured."""
    torch_ops = fused_provider_name("torch", VIA_DISPATCHER)
    rows = _overhead_rows({TRIVIAL_OP: 10.0, "freeu_kernels[torch]": 15.0, torch_ops: 25.0,
                           "freeu_kernels[cpu]": 12.0, fused_provider_name("cpu", VIA_DISPATCHER): 19.0})
    verdicts = {t["provider"]: t for t in evaluate_targets(rows, device_type) if t["target"] == OVERHEAD_TARGET}
    assert verdicts["freeu_kernels[torch]"]["verdict"] == NOT_MET
    assert verdicts["freeu_kernels[torch]"]["measured"].startswith(f"worst 2.50x ({torch_ops}); 1/2 rows within")
    assert verdicts["freeu_kernels[cpu]"]["verdict"] == MET
    for missing in ([], _overhead_rows({"freeu_kernels[cpu]": 12.0})):
        assert [t["verdict"] for t in evaluate_targets(missing, device_type)
                if t["target"] == OVERHEAD_TARGET] == [NOT_MEASURED]


def test_every_row_names_the_instruction_set(tiny_run):
    result, out, _ = tiny_run
    assert all(r["isa"] for r in result.rows)
    assert "- instruction set: " in (out / "report.md").read_text()


def test_crossover_labels_kernel_limits_as_not_supported(tiny_run):
    result, out, _ = tiny_run
    crossover = [r for r in result.rows if r["section"] == "crossover"]
    assert not any((r["note"] or "").startswith("failed") for r in crossover)
    report = (out / "report.md").read_text()
    assert "lower it" not in report and "could rise" not in report  # facts, no developer advice
    if "cpu" in freeu_kernels.available_backends("cpu"):
        limited = [r for r in crossover if r["provider"] == "lowrank[cpu]" and r["threshold"] == 9]
        assert limited and all(r["note"].startswith(NOT_SUPPORTED) and r["median_us"] is None for r in limited)
        assert "failed" not in report.split("## Low-rank vs FFT crossover")[1].split("## Plots")[0]


def test_outputs_survive_missing_matplotlib(tiny_run, tmp_path):
    result, _, _ = tiny_run
    with mock.patch.dict(sys.modules, {"matplotlib": None}):
        written = write_outputs(result, tmp_path)
    assert {path.name for path in written} == set(OUTPUT_FILES)
    assert "plots skipped: matplotlib is not installed" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["rows"]


def test_missing_diffusers_skips_the_unet_level_before_measuring():
    config = SuiteConfig(device="cpu", cases=[], crossover=False, overhead=False, unet_models=("sd15",),
                         unet_size="reduced", reduced_latent_size=16, op_budget=TINY, unet_budget=TINY, progress=None)
    with mock.patch.dict(sys.modules, {"diffusers": None}):
        result = run_suite(config)
    assert result.rows == [] and result.settings["unet"].startswith("skipped: diffusers is not installed")


def test_bench_modules_import_no_cycle():
    """No bench module imports one that imports it back (shared names live in bench/names.py)."""
    import ast

    modules = {path.stem: path for path in (REPO_ROOT / "bench").glob("*.py")}
    imports = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module.split(".")[0]} if node.module else {alias.name for alias in node.names}
        imports[name] = found & set(modules)

    def reaches(start, target, seen):
        return any(dep == target or (dep not in seen and reaches(dep, target, seen | {dep}))
                   for dep in imports[start])

    assert [name for name in modules if reaches(name, name, {name})] == []


def test_report_states_the_cpu_targets(tiny_run):
    _, out, _ = tiny_run
    report = (out / "report.md").read_text()
    for heading in ("## Targets", "## Op summary (eager)", "## U-Net step", "## Low-rank vs FFT crossover",
                    "## Per-case results"):
        assert heading in report
    # The SDXL target shapes were not run here, so the report must not invent numbers for them.
    assert "not measured" in report


def test_derived_concat_shapes_match_diffusers():
    """The concats cases.py derives are the ones a diffusers U-Net actually makes (reduced configs)."""
    from diffusers import UNet2DConditionModel

    real_cat = torch.cat
    for key in ("sd15", "sdxl"):
        config = reduced_config(MODELS[key].config, latent_size=16)
        seen = []

        def spy(tensors, dim=0, **kwargs):
            if dim == 1 and len(tensors) == 2 and tensors[0].dim() == 4:
                seen.append((tensors[0].shape[1], tensors[1].shape[1], tensors[1].shape[-1]))
            return real_cat(tensors, dim, **kwargs)

        unet = UNet2DConditionModel(**config).eval()
        with torch.inference_mode(), mock.patch("torch.cat", spy):
            unet(**unet_inputs(config, 1, torch.device("cpu"), torch.float32))
        expected = [(c.backbone, c.skip, c.size) for c in decoder_concats(config, config["sample_size"])]
        assert seen == expected, key


def test_case_lists_and_arguments():
    cases = op_cases([torch.float16], (2,), ["sdxl-1024"])
    shapes = {(c.x_shape, c.h_shape) for c in cases}
    assert ((2, 640, 64, 64), (2, 640, 64, 64)) in shapes
    assert ((2, 1280, 32, 32), (2, 1280, 32, 32)) in shapes
    target = next(c for c in cases if c.x_shape == (2, 640, 64, 64) and c.h_shape == (2, 640, 64, 64))
    assert target.bytes_moved == 2 * 2 * (2 * 640 * 64 * 64) * 2  # 42 MB
    assert parse_dtypes("fp32,bf16") == [torch.float32, torch.bfloat16]
    with pytest.raises(ValueError, match="dtypes"):
        parse_dtypes("int8")
    with pytest.raises(ValueError, match="families"):
        op_cases([torch.float32], (2,), ["sd3"])
    with pytest.raises(ValueError, match="h_shape"):
        Case((2, 4, 8, 8), (2, 4, 8, 9), torch.float32)
    with pytest.raises(ValueError, match="unet_models"):  # before anything is measured
        SuiteConfig(device="cpu", unet_models=("sd3",))


def test_crossover_forces_each_path_even_after_the_op_cached_its_plan(monkeypatch):
    """The crossover's "fft" call runs the torch backend's FFT path and "lowrank[torch]" its low-rank path,
    both at a threshold the op runs low-rank, and after the op has cached its own plan for the same call
    (forcing through the op's cutover at call time would silently time the cached path on both sides)."""
    from bench import crossover
    from bench.cases import CrossoverCase
    from bench.providers import make_inputs
    from freeu_kernels.backends import torch_backend

    case = CrossoverCase((1, 2, 24, 40), torch.float32, thresholds=(2,), title="paths")
    inputs = make_inputs(case.at(2, "box"), torch.device("cpu"))
    inputs.case = case.at(2, "box")
    freeu_kernels.fused_concat(inputs.x, inputs.h, inputs.b_tensor, inputs.s_tensor, threshold=2, backend="torch")
    ffts = []
    original = torch_backend.filter_skip_fft
    monkeypatch.setattr(torch_backend, "filter_skip_fft", lambda *a, **k: ffts.append(1) or original(*a, **k))
    fft, lowrank = crossover._forced_call(inputs, "torch", 0), crossover._forced_call(inputs, "torch", 1 << 30)
    expected = fused_concat_reference(inputs.x.double(), inputs.h.double(), inputs.b, inputs.s, 2)
    torch.testing.assert_close(fft().double(), expected, rtol=1e-5, atol=1e-5)
    assert len(ffts) == 1
    torch.testing.assert_close(lowrank().double(), expected, rtol=1e-5, atol=1e-5)
    assert len(ffts) == 1
