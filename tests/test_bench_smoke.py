"""The benchmark harness end to end on tiny cases: files written, columns present, numbers sane (< 60 s)."""

import csv
import json
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

# bench/ is a folder of the repository, not an installed package: make it importable under plain `pytest`.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench import OUTPUT_FILES, SuiteConfig, run_suite, write_outputs  # noqa: E402
from bench.cases import Case, CrossoverCase, decoder_concats, op_cases, parse_dtypes  # noqa: E402
from bench.results import COLUMNS  # noqa: E402
from bench.timing import TimingBudget  # noqa: E402
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
        crossover_cases=[CrossoverCase((1, 16, 16, 16), torch.float32, thresholds=(1, 9), title="tiny")],
        unet_models=("sd15",),
        unet_size="reduced",
        reduced_latent_size=16,
        op_budget=TINY,
        unet_budget=TINY,
        progress=None,
    )
    result = run_suite(config)
    written = write_outputs(result, out)
    return result, out, written


def test_writes_every_file(tiny_run):
    _, out, written = tiny_run
    names = {path.name for path in written}
    assert set(OUTPUT_FILES) <= names
    assert {"op_time.png", "op_gbps.png", "unet_overhead.png", "crossover.png"} <= names
    for path in written:
        assert path.exists() and path.stat().st_size > 0


def test_csv_and_json_have_the_long_format(tiny_run):
    _, out, _ = tiny_run
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and list(rows[0]) == COLUMNS
    for column in ("median_us", "p20_us", "p80_us", "gbps", "pct_of_copy", "vs_torch_cat", "speedup_vs_diffusers",
                   "device", "torch", "triton", "cuda", "date", "commit"):
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
