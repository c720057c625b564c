"""The harness API: configure a run, run it, write its files. ``python -m bench`` is a thin CLI over this."""

from __future__ import annotations

import importlib.util
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, TextIO, Tuple

import torch

from .cases import Case, CrossoverCase, SHORT_DTYPE, crossover_cases, op_cases, quick_op_cases, select_cases
from .crossover import iter_crossover
from .environment import collect_environment, load_average, pick_device
from .op_bench import iter_op_cases
from .overhead import run_overhead
from .plots import write_plots
from .providers import select_providers
from .report import build_summary, render_markdown, render_summary_text
from .results import ROWS_LOG, RowLog, add_derived_metrics, write_csv, write_json
from .timing import TimingBudget
from .unet_bench import UNET_SIZES, iter_unet_level
from .unet_configs import MODELS

__all__ = ["SuiteConfig", "SuiteResult", "SuiteInterrupted", "run_suite", "write_outputs", "missing_plot_dependency",
           "OUTPUT_FILES", "ROWS_LOG"]

OUTPUT_FILES = ("report.md", "results.json", "results.csv")


@dataclass
class SuiteConfig:
    """What to run. ``None`` fields take the defaults of the device and of ``quick``.

    ``cases`` / ``crossover`` replace the derived case lists (tests use tiny ones); ``case_patterns``
    filters whichever list is used (substrings or globs, see cases.select_cases). ``out``: a folder that
    receives ROWS_LOG (results.jsonl) while the run goes, every row flushed as its case finishes
    (write_outputs adds the other files afterwards, usually into the same folder).
    """

    device: Optional[str] = None
    dtypes: Optional[Sequence[torch.dtype]] = None
    batches: Optional[Sequence[int]] = None
    case_patterns: Optional[Sequence[str]] = None
    providers: Optional[Sequence[str]] = None
    quick: bool = False
    unet: bool = True
    overhead: bool = True
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
    out: Optional[Path] = None

    def __post_init__(self):
        if self.unet_size not in UNET_SIZES:
            raise ValueError(f"unet_size must be one of {UNET_SIZES}, got {self.unet_size!r}")
        unknown = [key for key in self.unet_models if key not in MODELS]
        if unknown:  # here, not after the op cases have been measured
            raise ValueError(f"unet_models must be among {list(MODELS)}, got {unknown}")
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


class SuiteInterrupted(KeyboardInterrupt):
    """A run cut off by KeyboardInterrupt (Ctrl-C; SIGTERM under ``python -m bench``) after its setup.

    ``result`` holds every case that finished, its settings marked ``partial`` ("interrupted after N
    cases ..."): pass it to write_outputs. A KeyboardInterrupt, so code that catches Exception still
    lets it through.
    """

    def __init__(self, result: SuiteResult, reason: str):
        super().__init__(reason)
        self.result = result
        self.reason = reason


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
        "compile": compile_modes, "unet": config.unet, "unet_size": config.unet_size, "overhead": config.overhead,
        "crossover": config.crossover, "op_budget_s": op_budget.seconds, "unet_budget_s": unet_budget.seconds,
    }
    progress = config.progress
    # Optional dependencies are checked before the first measurement, never after minutes of it.
    run_unet = config.unet
    if run_unet and importlib.util.find_spec("diffusers") is None:
        run_unet = False
        settings["unet"] = "skipped: diffusers is not installed (pip install diffusers)"
        if progress is not None:
            print("bench: diffusers is not installed: the U-Net level and the diffusers provider are skipped",
                  file=progress, flush=True)
    if progress is not None:
        print(f"bench: {environment['device']}, {environment['isa']}, {len(cases)} op cases, providers "
              f"{settings['providers']}", file=progress, flush=True)
    chosen_crossover = []
    if config.crossover:
        chosen_crossover = (config.crossover_cases if config.crossover_cases is not None
                            else crossover_cases(dtypes, config.quick))
    # (section, how many cases it has, its cases' rows as each finishes); generators: nothing runs yet.
    sections = [
        ("overhead", int(config.overhead),
         _overhead_section(providers, device, environment, progress, config.overhead)),
        ("op", len(cases), iter_op_cases(cases, providers, device, op_budget, environment, graphs=config.graphs,
                                         progress=progress)),
        ("crossover", sum(len(c.thresholds) * len(c.masks) for c in chosen_crossover),
         iter_crossover(chosen_crossover, device, op_budget, environment, progress=progress)),
        ("unet", len(config.unet_models) if run_unet else 0,
         iter_unet_level(config.unet_models if run_unet else (), device, size=config.unet_size,
                         reduced_latent_size=config.reduced_latent_size, compile_modes=compile_modes,
                         budget=unet_budget, environment=environment, progress=progress)),
    ]
    log = RowLog(None if config.out is None else Path(config.out) / ROWS_LOG)
    try:
        for section, _, case_rows in sections:
            for rows in case_rows:
                log.add(section, rows)
    except KeyboardInterrupt as interruption:
        settings["partial"] = _interrupted_note(log.cases, {name: total for name, total, _ in sections},
                                                interruption)
        raise SuiteInterrupted(_finish(environment, settings, log.rows, started), settings["partial"]) from interruption
    finally:
        log.close()
    return _finish(environment, settings, log.rows, started)


def _overhead_section(providers, device: torch.device, environment: Dict, progress: Optional[TextIO],
                      enabled: bool) -> Iterator[List[Dict]]:
    """The per-call overhead probe as a section of one case (nothing runs until the suite asks for it)."""
    if enabled:
        yield run_overhead(providers, device, environment, progress=progress)


def _interrupted_note(done: Dict[str, int], planned: Dict[str, int], interruption: KeyboardInterrupt) -> str:
    """'interrupted after N cases (SIGTERM): overhead 1 of 1, op 3 of 8, crossover 0 of 16'."""
    count = sum(done.values())
    signal_name = str(interruption) or "KeyboardInterrupt"
    parts = [f"{name} {done.get(name, 0)} of {total}" for name, total in planned.items() if total]
    return (f"interrupted after {count} case{'' if count == 1 else 's'} ({signal_name}): " + ", ".join(parts))


def _finish(environment: Dict, settings: Dict, rows: List[Dict], started: float) -> SuiteResult:
    """The SuiteResult of the rows measured so far (all of them, or those before an interruption)."""
    environment["load_average_end"] = load_average()
    add_derived_metrics(rows)
    summary = build_summary(rows, environment)
    return SuiteResult(environment, settings, rows, summary, time.perf_counter() - started)


def missing_plot_dependency() -> Optional[str]:
    """None when the plots can be drawn, else the line saying why they are skipped."""
    if importlib.util.find_spec("matplotlib") is None:
        return "plots skipped: matplotlib is not installed (pip install matplotlib, or pass --no-plots)"
    return None


def write_outputs(result: SuiteResult, out_dir, plots: bool = True) -> List[Path]:
    """Write report.md, results.json, results.csv and (``plots``) the PNGs into ``out_dir``; return the paths.

    The measurements are written first; the plots come last, so a plotting problem (matplotlib missing
    or failing) costs the plots only, and report.md says why they are absent. A partial result (from
    SuiteInterrupted) gets no plots: its files are written in the seconds a killed process has left.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = dict(result.settings, run_seconds=round(result.seconds, 1))
    if "partial" in settings and plots:
        # After a SIGTERM the process has seconds (tools/gpu_verify.sh: 5) before SIGKILL: numbers first.
        plots, plot_note = False, "plots skipped: the run was interrupted"
    else:
        plot_note = missing_plot_dependency() if plots else None
    write_json(out_dir / "results.json", result.environment, settings, result.rows, result.summary)
    write_csv(out_dir / "results.csv", result.rows)
    report = out_dir / "report.md"
    report.write_text(render_markdown(result.environment, settings, result.rows, result.summary,
                                      plot_note=plot_note))
    images: List[str] = []
    if plots and plot_note is None:
        try:
            images = write_plots(out_dir, result.rows, result.summary)
        except Exception as error:  # noqa: BLE001 - the measurements are already on disk
            plot_note = f"plots failed: {type(error).__name__}: {error}"
        report.write_text(render_markdown(result.environment, settings, result.rows, result.summary, images,
                                          plot_note=plot_note))
    return [out_dir / name for name in OUTPUT_FILES] + [out_dir / name for name in images]


def summary_text(result: SuiteResult) -> str:
    """The table ``python -m bench`` prints at the end."""
    return render_summary_text(result.environment, result.summary, result.rows)
