"""The harness API: configure a run, run it, write its files. ``python -m bench`` is a thin CLI over this."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, TextIO, Tuple

import torch

from .cases import Case, CrossoverCase, SHORT_DTYPE, crossover_cases, op_cases, quick_op_cases, select_cases
from .crossover import run_crossover
from .environment import collect_environment, load_average, pick_device
from .op_bench import run_op_cases
from .plots import write_plots
from .providers import select_providers
from .report import build_summary, render_markdown, render_summary_text
from .results import add_derived_metrics, write_csv, write_json
from .timing import TimingBudget
from .unet_bench import UNET_SIZES, run_unet_level

__all__ = ["SuiteConfig", "SuiteResult", "run_suite", "write_outputs", "OUTPUT_FILES"]

OUTPUT_FILES = ("report.md", "results.json", "results.csv")


@dataclass
class SuiteConfig:
    """What to run. ``None`` fields take the defaults of the device and of ``quick``.

    ``cases`` / ``crossover`` replace the derived case lists (tests use tiny ones); ``case_patterns``
    filters whichever list is used (substrings or globs, see cases.select_cases).
    """

    device: Optional[str] = None
    dtypes: Optional[Sequence[torch.dtype]] = None
    batches: Optional[Sequence[int]] = None
    case_patterns: Optional[Sequence[str]] = None
    providers: Optional[Sequence[str]] = None
    quick: bool = False
    unet: bool = True
    unet_models: Sequence[str] = ("sd15", "sdxl")
    unet_size: str = "auto"
    reduced_latent_size: int = 32
    crossover: bool = True
    graphs: bool = True
    compile: Optional[bool] = None
    # CPU only; None: 1 thread (see run_suite). Restored when the run ends.
    threads: Optional[int] = None
    cases: Optional[List[Case]] = None
    crossover_cases: Optional[List[CrossoverCase]] = None
    op_budget: Optional[TimingBudget] = None
    unet_budget: Optional[TimingBudget] = None
    progress: Optional[TextIO] = field(default=sys.stderr, repr=False)

    def __post_init__(self):
        if self.unet_size not in UNET_SIZES:
            raise ValueError(f"unet_size must be one of {UNET_SIZES}, got {self.unet_size!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


@dataclass
class SuiteResult:
    """A finished run: where and how it ran, every row, and the summary built from them."""

    environment: Dict
    settings: Dict
    rows: List[Dict]
    summary: Dict
    seconds: float


def _default_dtypes(device: torch.device) -> List[torch.dtype]:
    # float16 on a CPU is emulated and no CPU pipeline runs in it: float32 and bfloat16 there. On a GPU all
    # three (with --quick too: they are cheap there, and float16 is what the GPU targets name).
    if device.type == "cpu":
        return [torch.float32, torch.bfloat16]
    return [torch.float16, torch.bfloat16, torch.float32]


def _default_batches(device: torch.device) -> Tuple[int, ...]:
    # Batch 8 of SDXL at 2048 px is 1.3 GB per fp32 input: seconds per FFT call on a CPU, hours for the
    # whole list. The CPU default stops at batch 2 (--batches 1,2,8 restores it).
    return (1, 2, 8) if device.type == "cuda" else (1, 2)


def _budgets(device: torch.device, quick: bool):
    """(op, U-Net) timing budgets. More rounds where the machine is shared (CPU) and for the U-Net, whose
    FreeU overhead is a ratio of two close numbers estimated per round."""
    if device.type == "cuda":
        op = TimingBudget(seconds=0.05 if quick else 0.1, min_reps=20, max_reps=1000, warmup=3, rounds=3)
        unet = TimingBudget(seconds=1.5 if quick else 4.0, min_reps=20, max_reps=300, warmup=3, rounds=10)
    else:
        op = TimingBudget(seconds=0.25 if quick else 1.0, min_reps=5 if quick else 7, max_reps=200, warmup=2,
                          rounds=5 if quick else 7)
        unet = TimingBudget(seconds=2.0 if quick else 6.0, min_reps=14, max_reps=100, warmup=2, rounds=7)
    return op, unet


def run_suite(config: SuiteConfig) -> SuiteResult:
    """Run the op cases, the crossover family and the U-Net level as configured; return every row."""
    device = pick_device(config.device)
    saved_threads = torch.get_num_threads()
    # One intra-op thread by default on a CPU: on a shared machine a parallel op waits for its slowest
    # thread, and a descheduled worker turns a 20 us op into a 10 ms one (seen on the 2-core CI box under
    # load). The CPU numbers are for ratios between providers, which one thread measures reproducibly.
    if device.type == "cpu":
        torch.set_num_threads(config.threads or 1)
    try:
        return _run(config, device)
    finally:
        torch.set_num_threads(saved_threads)


def _run(config: SuiteConfig, device: torch.device) -> SuiteResult:
    started = time.perf_counter()
    dtypes = list(config.dtypes) if config.dtypes else _default_dtypes(device)
    compile_modes = device.type == "cuda" and not config.quick if config.compile is None else config.compile
    op_budget, unet_budget = _budgets(device, config.quick)
    op_budget = config.op_budget or op_budget
    unet_budget = config.unet_budget or unet_budget
    if config.cases is not None:
        cases = list(config.cases)
    elif config.quick:
        cases = quick_op_cases(dtypes, batch=(config.batches or (2,))[0])
    else:
        cases = op_cases(dtypes, config.batches or _default_batches(device))
    cases = select_cases(cases, config.case_patterns)
    providers = select_providers(device, config.providers, config.quick)
    environment = collect_environment(device)
    settings = {
        "quick": config.quick, "dtypes": ",".join(SHORT_DTYPE[d] for d in dtypes), "cases": len(cases),
        "providers": ",".join(p.name for p in providers), "graphs": config.graphs and device.type == "cuda",
        "compile": compile_modes, "unet": config.unet, "unet_size": config.unet_size,
        "crossover": config.crossover, "op_budget_s": op_budget.seconds, "unet_budget_s": unet_budget.seconds,
    }
    progress = config.progress
    if progress is not None:
        print(f"bench: {environment['device']}, {len(cases)} op cases, providers {settings['providers']}",
              file=progress, flush=True)
    rows = run_op_cases(cases, providers, device, op_budget, environment, graphs=config.graphs, progress=progress)
    if config.crossover:
        chosen = config.crossover_cases if config.crossover_cases is not None else crossover_cases(dtypes, config.quick)
        rows += run_crossover(chosen, device, op_budget, environment, progress=progress)
    if config.unet:
        rows += run_unet_level(config.unet_models, device, size=config.unet_size,
                               reduced_latent_size=config.reduced_latent_size, compile_modes=compile_modes,
                               budget=unet_budget, environment=environment, progress=progress)
    environment["load_average_end"] = load_average()
    add_derived_metrics(rows)
    summary = build_summary(rows, environment)
    return SuiteResult(environment, settings, rows, summary, time.perf_counter() - started)


def write_outputs(result: SuiteResult, out_dir, plots: bool = True) -> List[Path]:
    """Write report.md, results.json, results.csv and (``plots``) the PNGs into ``out_dir``; return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = write_plots(out_dir, result.rows, result.summary) if plots else []
    settings = dict(result.settings, run_seconds=round(result.seconds, 1))
    (out_dir / "report.md").write_text(render_markdown(result.environment, settings, result.rows, result.summary,
                                                       images))
    write_json(out_dir / "results.json", result.environment, settings, result.rows, result.summary)
    write_csv(out_dir / "results.csv", result.rows)
    return [out_dir / name for name in OUTPUT_FILES] + [out_dir / name for name in images]


def summary_text(result: SuiteResult) -> str:
    """The table ``python -m bench`` prints at the end."""
    return render_summary_text(result.environment, result.summary, result.rows)
