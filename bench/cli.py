"""Command line of the benchmark suite: parse options into a SuiteConfig, run, write, print the summary."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

from .cases import parse_dtypes
from .environment import pick_device
from .providers import select_providers
from .suite import (ROWS_LOG, SuiteConfig, SuiteInterrupted, missing_plot_dependency, run_suite, summary_text,
                    write_outputs)
from .unet_bench import UNET_SIZES

__all__ = ["main", "build_parser"]

DEFAULT_OUT = Path(__file__).resolve().parent / "out"


def _comma_list(text: str) -> List[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _batches(text: str) -> List[int]:
    try:
        values = [int(item) for item in _comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batches must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--batches must list integers >= 1, got {text!r}")
    return values


def _dtypes(text: str):
    try:
        return parse_dtypes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``python -m bench``."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark FreeU at the U-Net's skip concats: freeu_kernels backends against diffusers, the "
                    "official FFT path, torch.cat and the copy ceiling; plus the low-rank/FFT crossover and the "
                    "FreeU overhead per U-Net step. Writes report.md, results.json, results.csv and PNG plots.",
    )
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if present, else cpu)")
    parser.add_argument("--dtypes", type=_dtypes,
                        help="comma list among fp16,bf16,fp32 (default: fp32,bf16 on CPU; all three on CUDA)")
    parser.add_argument("--batches", type=_batches, help="comma list of batch sizes (default 1,2,8 on CUDA, 1,2 on CPU; --quick: 2)")
    parser.add_argument("--cases", type=_comma_list,
                        help="comma list of substrings or globs matched against case labels and families, "
                             "e.g. 'sdxl-1024' or '*640+640@64x64*'")
    parser.add_argument("--providers", type=_comma_list,
                        help="comma list of providers (diffusers, diffusers+compile, torch.cat, copy, reference, "
                             "freeu_kernels[torch|cpu|triton|cuda], or 'freeu_kernels' for all backends)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--quick", action="store_true",
                        help="a few cases at batch 2, fewer repetitions and thresholds; about 2 minutes on a 2-core CPU")
    parser.add_argument("--no-unet", dest="unet", action="store_false", help="skip the U-Net-level benchmark")
    parser.add_argument("--unet-size", choices=UNET_SIZES, default="auto",
                        help="published configs (real) or the reduced CPU configs (default: real on CUDA, reduced on CPU)")
    parser.add_argument("--no-overhead", dest="overhead", action="store_false",
                        help="skip the per-call overhead on a tiny input")
    parser.add_argument("--no-crossover", dest="crossover", action="store_false",
                        help="skip the low-rank vs FFT crossover family")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="write no PNG plots")
    parser.add_argument("--no-graphs", dest="graphs", action="store_false", help="CUDA: skip the CUDA-graph timings")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="also time torch.compile'd U-Nets (default: on CUDA without --quick)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="never time compiled U-Nets")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default 1: reproducible on a shared machine)")
    return parser


@contextlib.contextmanager
def sigterm_raises_keyboard_interrupt() -> Iterator[List[int]]:
    """While inside, SIGTERM (what ``timeout`` sends) raises KeyboardInterrupt("SIGTERM") in the main thread,
    so the suite unwinds as on Ctrl-C and writes what it measured. Only the first SIGTERM raises: a second
    one (an impatient sender) must not break the writing of the partial files. Yields the list of the
    signals delivered (empty, or [SIGTERM])."""
    delivered: List[int] = []

    def raise_once(signum, frame):
        if not delivered:
            delivered.append(signum)
            raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, raise_once)
    try:
        yield delivered
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_status(delivered: List[int]) -> int:
    # The shell's convention for a process ended by a signal: 128 + its number (SIGINT: Ctrl-C).
    return 128 + (delivered[0] if delivered else signal.SIGINT)


def _paths(out: Path, written: List[Path]) -> str:
    return ", ".join(str(path) for path in [out / ROWS_LOG] + written)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the suite from command-line arguments; 0 on success, 2 on a bad option, 128 + the signal's number
    (143 SIGTERM, 130 Ctrl-C) when interrupted, after writing the files of the cases that finished."""
    args = build_parser().parse_args(argv)
    try:
        config = SuiteConfig(device=args.device, dtypes=args.dtypes, batches=args.batches, case_patterns=args.cases,
                             providers=args.providers, quick=args.quick, unet=args.unet, unet_size=args.unet_size,
                             crossover=args.crossover, overhead=args.overhead, graphs=args.graphs,
                             compile=args.compile, threads=args.threads, out=args.out)
        # Bad names fail here, in a second, rather than after minutes of measuring.
        select_providers(pick_device(config.device), config.providers)
    except ValueError as error:
        print(f"python -m bench: error: {error}", file=sys.stderr)
        return 2
    if args.plots and missing_plot_dependency() is not None:
        # Said before the run; the measurements are still written, and report.md repeats the line.
        print(f"python -m bench: {missing_plot_dependency()}", file=sys.stderr)
    with sigterm_raises_keyboard_interrupt() as delivered:
        try:
            result = run_suite(config)
        except SuiteInterrupted as interrupted:
            written = write_outputs(interrupted.result, args.out, plots=args.plots)
            print(summary_text(interrupted.result))
            print(f"\npython -m bench: partial: {interrupted.reason}; wrote {_paths(args.out, written)}",
                  file=sys.stderr)
            return _exit_status(delivered)
        except KeyboardInterrupt:  # during the setup, before the first case: nothing to write
            print("python -m bench: interrupted before any case was measured", file=sys.stderr)
            return _exit_status(delivered)
    written = write_outputs(result, args.out, plots=args.plots)
    print(summary_text(result))
    print(f"\nwrote {_paths(args.out, written)} in {result.seconds:.0f} s", file=sys.stderr)
    return 0
