"""``python -m bench.codegen [--quick] [--out DIR] [--backends triton,cuda] [--archs 90,80] [--cases GLOB,...]``

Compiles the GPU kernels for each case on a CPU-only machine, counts their SASS and writes DIR/report.md and
DIR/results.json (default bench/out/codegen/). Exit status 0 even when budgets are violated (the report lists
them; ``--check`` makes violations exit 1).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from . import budgets
from .cases import all_cases, quick_cases, select_cases
from .report import ARCHS, BACKENDS, environment_meta, run, write_outputs

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "out" / "codegen"


def _comma_list(text: str) -> List[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _backends(text: str) -> List[str]:
    names = _comma_list(text)
    unknown = [name for name in names if name not in BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--backends must list some of {','.join(BACKENDS)}, got {text!r}")
    return names


def _archs(text: str) -> List[int]:
    try:
        archs = [int(item) for item in _comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--archs must be comma-separated integers, got {text!r}") from None
    if not archs or any(arch not in ARCHS for arch in archs):
        raise argparse.ArgumentTypeError(f"--archs must list some of {','.join(map(str, ARCHS))}, got {text!r}")
    return archs


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m bench.codegen", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true",
                        help="SDXL 32x32 and 64x64, fp16 and bf16, threshold 1, sm_90 only")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--backends", type=_backends, default=list(BACKENDS), help="default triton,cuda")
    parser.add_argument("--archs", type=_archs, default=None, help="default 90,80 (--quick: 90)")
    parser.add_argument("--cases", type=_comma_list, default=None,
                        help="globs on case names or name/dtype, e.g. 'sdxl-64x64*,*/bf16'")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="worker processes, one (backend, arch) pair each at a time (default min(2, CPUs))")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per build, best effort (default 900)")
    parser.add_argument("--keep-sass", action="store_true", help="also write each role's SASS to OUT/sass/")
    parser.add_argument("--check", action="store_true", help="exit 1 when a budget is violated")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the report; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.jobs < 1:
        raise SystemExit("--jobs must be >= 1")
    cases = select_cases(quick_cases() if args.quick else all_cases(), args.cases)
    if not cases:
        raise SystemExit(f"--cases {args.cases} matches no case")
    archs = args.archs or ([90] if args.quick else list(ARCHS))

    rows = run(cases, args.backends, archs, jobs=args.jobs, timeout_s=args.timeout,
               sass_dir=str(args.out / "sass") if args.keep_sass else None, verbose=True)
    command = "python -m bench.codegen " + " ".join(sys.argv[1:] if argv is None else argv)
    md, js = write_outputs(rows, args.out, environment_meta(command.strip()))
    violations = budgets.check(rows)
    print(f"wrote {md} and {js}: {len(rows)} rows, {sum(1 for r in rows if r.get('error'))} failed, "
          f"{len(violations)} budget violations")
    return 1 if args.check and violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
