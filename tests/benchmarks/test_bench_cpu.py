"""CPU regression benchmarks (pytest-benchmark): torch backend vs torch.cat vs the reference at SDXL's
(2, 1280, 32, 32) + (2, 1280, 32, 32) concat, float32 and bfloat16.

Skipped by the default test run (pyproject's addopts has --benchmark-skip); run them with

    PYTHONPATH=. pytest tests/benchmarks --benchmark-only [--benchmark-autosave | --benchmark-compare]

The calls are the harness's own providers (bench/providers.py) on one thread, so these numbers and
`python -m bench` time the same thing. Each result's extra_info carries the host's instruction set, the
call's peak extra memory and its aten op count (bench/memory.py), so a saved run says what it ran on.
"""

import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.cases import Case  # noqa: E402
from bench.environment import collect_environment  # noqa: E402
from bench.memory import profile_call  # noqa: E402
from bench.providers import all_providers, make_inputs  # noqa: E402

SDXL_SHAPE = (2, 1280, 32, 32)
PROVIDERS = ("freeu_kernels[torch]", "torch.cat", "reference")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread, as `python -m bench` uses on a CPU: reproducible on a shared machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("provider_name", PROVIDERS)
def test_sdxl_concat(benchmark, provider_name, dtype_name):
    device = torch.device("cpu")
    case = Case(SDXL_SHAPE, SDXL_SHAPE, DTYPES[dtype_name], ("sdxl-1024",))
    provider = next(p for p in all_providers(device) if p.name == provider_name)
    call = provider.prepare(make_inputs(case, device)).call
    benchmark.group = f"sdxl 1280+1280@32x32 b2 {dtype_name}"
    call()
    profiled = profile_call(call, device)
    benchmark.extra_info.update(bytes_moved=case.bytes_moved, threads=torch.get_num_threads(),
                                isa=collect_environment(device)["isa"], peak_extra_bytes=profiled.peak_extra_bytes,
                                aten_ops=profiled.aten_ops)
    benchmark.pedantic(call, warmup_rounds=2, rounds=15, iterations=1)
