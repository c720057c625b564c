"""Turn KernelBuilds into report rows, run the targets over the cases, write report.md and results.json.

One row per backend x case x dtype x arch (keys in :func:`analyse`). A target that is missing, a tool that is
missing (nvcc, ptxas) or a build that raises gives a row with ``error`` set; the run goes on.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import importlib
import json
import math
import multiprocessing
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from . import budgets, devices, sass
from .model import CodegenCase, KernelBuild, RoleCode

__all__ = ["BACKENDS", "ARCHS", "analyse", "build_row", "build_rows", "progress_line", "run", "report_markdown",
           "write_outputs"]

BACKENDS = ("triton", "cuda")
ARCHS = (90, 80)
# Tolerance of the auxiliary-bytes test of _width_stats (predicated tails make counts slightly inexact).
_BULK_SHARE = 0.01


def _case_fields(case: CodegenCase) -> Dict:
    return {
        "case": case.name, "dtype": case.dtype, "x_shape": list(case.x_shape), "h_shape": list(case.h_shape),
        "threshold": case.threshold, "mask": case.mask, "version": case.version,
        "channels_last": case.channels_last, "element_size": case.element_size,
        "output_elements": case.output_elements, "bytes_moved": case.bytes_moved,
    }


def _role_row(role: RoleCode) -> Dict:
    """Counted quantities of one role, per thread and per program."""
    instrs = sass.parse(role.sass)
    weighted = sass.instruction_weights(instrs, role.loop_trips)
    per_thread = sum(weight for _, weight in weighted)
    accesses = sass.global_accesses(instrs, role.loop_trips)
    inflight = sass.loads_before_first_use(instrs, role.loop_trips)
    threads = role.threads_per_program

    def traffic(kind: str) -> Dict[int, Dict[str, float]]:
        by_bits: Dict[int, Dict[str, float]] = {}
        for access in accesses:
            if access.kind == kind and access.weight > 0:
                entry = by_bits.setdefault(access.bits, {"executions": 0.0, "bytes": 0.0})
                entry["executions"] += access.weight * threads
                entry["bytes"] += access.weight * threads * access.bits / 8
        return by_bits

    return {
        "role": role.role,
        "programs": role.programs,
        "threads_per_program": threads,
        "elements_per_program": role.elements_per_program,
        "loops": len(sass.find_loops(instrs)),
        "loop_trips": list(role.loop_trips),
        "static_instructions": len(sass.executed(instrs)),
        "instructions_per_thread": per_thread,
        "instructions_per_element": per_thread * threads / role.elements_per_program
        if role.elements_per_program else math.inf,
        "loads_by_bits": traffic("load"),
        "stores_by_bits": traffic("store"),
        "barriers_per_program": sass.barrier_count(instrs, role.loop_trips),
        "in_flight_max_bytes_per_thread": inflight.max_bytes,
        "in_flight_mean_bytes_per_thread": inflight.mean_bytes,
        "note": role.note,
    }


def _width_stats(roles: Sequence[Dict], key: str, needed_bytes: float):
    """(narrowest stream width, execution-weighted mean width, bytes moved by the launch).

    The stream width: widths are set aside, narrowest first, while the bytes set aside fit in the bytes
    moved beyond ``needed_bytes`` (what the op must move: the inputs once, or the output once). Those are
    auxiliary accesses (twiddle tables, the factors, a scale map); the narrowest width left is the one the
    data itself moves with.
    """
    merged: Dict[int, Dict[str, float]] = {}
    for role in roles:
        for bits, entry in role[key].items():
            into = merged.setdefault(int(bits), {"executions": 0.0, "bytes": 0.0})
            into["executions"] += entry["executions"] * role["programs"]
            into["bytes"] += entry["bytes"] * role["programs"]
    total_bytes = sum(entry["bytes"] for entry in merged.values())
    total_exec = sum(entry["executions"] for entry in merged.values())
    if not total_bytes:
        return None, None, 0.0
    spare = (total_bytes - needed_bytes) * (1 + _BULK_SHARE)
    widths = sorted(merged)
    while len(widths) > 1 and merged[widths[0]]["bytes"] <= spare:
        spare -= merged[widths[0]]["bytes"]
        widths.pop(0)
    mean = sum(bits * entry["executions"] for bits, entry in merged.items()) / total_exec
    return widths[0], mean, total_bytes


def _grid_programs(build: KernelBuild) -> int:
    grid = build.launch.get("grid") if isinstance(build.launch, dict) else None
    if grid:
        return math.prod(grid) if isinstance(grid, (list, tuple)) else int(grid)
    return sum(role.programs for role in build.roles)


def analyse(build: KernelBuild) -> Dict:
    """The report row of one build (see bench/codegen/devices.py for the model)."""
    case = build.case
    row = {"backend": build.backend, "arch": build.arch, **_case_fields(case)}
    roles = [_role_row(role) for role in build.roles]
    for role in roles:  # > 1: the role loads more than its own elements (tables, two sweeps, masked loads)
        own = role["elements_per_program"] * case.element_size
        loaded = sum(entry["bytes"] for entry in role["loads_by_bits"].values())
        role["load_bytes_per_input_byte"] = loaded / own if own else None
    elements = case.output_elements
    covered = sum(role["programs"] * role["elements_per_program"] for role in roles)
    thread_instructions = sum(role["instructions_per_thread"] * role["threads_per_program"] * role["programs"]
                              for role in roles)
    data_bytes = elements * case.element_size  # inputs read once = output written once
    load_min, load_mean, load_bytes = _width_stats(roles, "loads_by_bits", data_bytes)
    store_min, store_mean, store_bytes = _width_stats(roles, "stores_by_bits", data_bytes)
    blocks, limiter = devices.blocks_per_sm(build.arch, build.registers, build.shared_bytes,
                                            build.threads_per_program)
    grid = _grid_programs(build)
    sms = devices.DEVICES["h100"].sms
    resident = min(blocks, math.ceil(grid / sms)) if grid else 0
    # Bytes in flight of the launch: each role's mean (per thread, and per program) weighted by the bytes
    # that role loads, so the role that streams most of the data sets the figure.
    role_load_bytes = [sum(e["bytes"] for e in role["loads_by_bits"].values()) * role["programs"] for role in roles]
    loaded = sum(role_load_bytes)

    def load_weighted(value) -> float:
        return sum(b * value(role) for b, role in zip(role_load_bytes, roles)) / loaded if loaded else 0.0

    in_flight_thread = load_weighted(lambda role: role["in_flight_mean_bytes_per_thread"])
    in_flight_program = load_weighted(
        lambda role: role["in_flight_mean_bytes_per_thread"] * role["threads_per_program"])
    in_flight_sm = in_flight_program * resident
    ipe = thread_instructions / elements if elements else math.inf
    row.update({
        "registers": build.registers,
        "spill_bytes": build.spill_bytes,
        "shared_bytes": build.shared_bytes,
        "threads_per_program": build.threads_per_program,
        "programs": grid,
        "blocks_per_sm": blocks,
        "occupancy_limiter": limiter,
        "resident_blocks_per_sm": resident,
        "instructions_per_element": ipe,
        "instructions_per_element_by_role": {role["role"]: role["instructions_per_element"] for role in roles},
        "load_bits_min": load_min,
        "load_bits_weighted": load_mean,
        "store_bits_min": store_min,
        "store_bits_weighted": store_mean,
        "load_bytes_per_input_byte": load_bytes / (elements * case.element_size) if elements else None,
        "store_bytes_per_output_byte": store_bytes / (elements * case.element_size) if elements else None,
        "roles_cover_output": covered / elements if elements else None,
        "barriers_per_tile": max((role["barriers_per_program"] for role in roles), default=0.0),
        "in_flight_bytes_per_thread": in_flight_thread,
        "bytes_in_flight_per_sm": in_flight_sm,
        "compile_seconds": build.compile_seconds,
        "launch": build.launch,
        "notes": list(build.notes),
        "roles": roles,
        "error": None,
    })
    for key, device in devices.DEVICES.items():
        if build.arch == 90:
            model = devices.modelled_fraction(device, ipe, case.element_size, in_flight_sm)
            row[f"modelled_fraction_of_copy_{key}"] = model["fraction"]
            row[f"issue_limit_{key}"] = model["issue_limit"]
            row[f"latency_limit_{key}"] = model["latency_limit"]
        else:  # the modelled devices are sm_90 parts
            row[f"modelled_fraction_of_copy_{key}"] = None
    if covered and abs(covered / elements - 1) > 0.01:
        row["notes"].append(f"roles cover {covered / elements:.3f} of the output elements")
    return row


class _Timeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Timeout()


def load_target(backend: str):
    """bench.codegen.<backend>_target, imported on first use (it may not exist yet)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return importlib.import_module(f"{__package__}.{backend}_target")


def build_row(backend: str, case: CodegenCase, arch: int, sass_dir: Optional[str] = None,
              timeout_s: float = 0) -> Dict:
    """Build and analyse one backend x case x arch; never raises: failures give a row with ``error``.

    ``timeout_s`` (> 0) stops the build with SIGALRM where the platform has it; the alarm fires when control
    returns to Python (between compiler stages, or while waiting on ptxas/nvcc), so it is a best effort.
    """
    row = {"backend": backend, "arch": arch, **_case_fields(case)}
    started = time.perf_counter()
    use_alarm = timeout_s > 0 and hasattr(signal, "SIGALRM")
    if use_alarm:
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.alarm(int(math.ceil(timeout_s)))
    try:
        try:
            target = load_target(backend)
        except ModuleNotFoundError as error:
            if error.name == f"{__package__}.{backend}_target":
                raise RuntimeError(f"target module {error.name} does not exist yet") from None
            raise
        build = target.build(case, arch)
        if not isinstance(build, KernelBuild):
            raise TypeError(f"{backend}_target.build must return a KernelBuild, got {type(build).__name__}")
        if use_alarm:
            signal.alarm(0)
        result = analyse(build)
        if sass_dir:
            folder = Path(sass_dir)
            folder.mkdir(parents=True, exist_ok=True)
            for role in build.roles:
                name = f"{backend}-{case.name}-{case.dtype}-sm{arch}-{role.role}.sass"
                (folder / name).write_text(role.sass)
        result["verdicts"] = budgets.evaluate(result)
        return result
    except _Timeout:
        row["error"] = f"build did not finish within {timeout_s:g} s (--timeout)"
    except FileNotFoundError as error:
        row["error"] = f"tool missing: {error}"
    except Exception as error:  # the report lists the failure and goes on
        row["error"] = f"{type(error).__name__}: {error}\n" + "".join(traceback.format_exc(limit=6)[-2000:])
    finally:
        if use_alarm:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    row["compile_seconds"] = time.perf_counter() - started
    row["verdicts"] = budgets.evaluate(row)
    return row


def _worker_init():
    # The report compiles real kernels: Triton's interpreter (TRITON_INTERPRET=1, set by the CI test run)
    # would turn every @triton.jit into an interpreted function that cannot be compiled.
    os.environ.pop("TRITON_INTERPRET", None)
    # An empty Triton cache per worker: compile_seconds is then a cold compile, the JIT time a first call
    # pays on a GPU, not a cache hit left by an earlier run.
    cache = tempfile.mkdtemp(prefix="freeu-codegen-triton-cache-")
    os.environ["TRITON_CACHE_DIR"] = cache
    atexit.register(shutil.rmtree, cache, True)


def _row_key(row: Dict):
    return (BACKENDS.index(row["backend"]) if row["backend"] in BACKENDS else 99, -row["arch"], row["case"],
            row["dtype"])


def progress_line(row: Dict) -> str:
    """One line per finished build: what it is and its headline numbers or its error."""
    status = row["error"].splitlines()[0] if row.get("error") else (
        f"{row['instructions_per_element']:.1f} instr/elem, {row['registers']} regs, "
        f"{row['compile_seconds']:.1f} s")
    return f"[codegen] {row['backend']} {row['case']} {row['dtype']} sm_{row['arch']}: {status}"


def build_rows(backend: str, arch: int, cases: Sequence[CodegenCase], sass_dir: Optional[str] = None,
               timeout_s: float = 0, verbose: bool = False) -> List[Dict]:
    """:func:`build_row` for each case in turn, in one process: a target's per-arch work (one nvcc run of
    the CUDA source) is done once for all of them. ``verbose`` prints :func:`progress_line` to stderr."""
    rows = []
    for case in cases:
        rows.append(build_row(backend, case, arch, sass_dir, timeout_s))
        if verbose:
            print(progress_line(rows[-1]), file=sys.stderr, flush=True)
    return rows


def run(cases: Sequence[CodegenCase], backends: Sequence[str] = BACKENDS, archs: Sequence[int] = (90,),
        jobs: int = 2, sass_dir: Optional[str] = None, timeout_s: float = 900,
        verbose: bool = False) -> List[Dict]:
    """Rows for every backend x case x arch.

    One task per (backend, arch), run by ``jobs`` worker processes (spawned, so the workers' Triton never runs
    in interpreter mode whatever the caller's environment). With 2 cores that is as fast as finer tasks and
    compiles a target's per-arch code once.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    for backend in backends:
        if backend not in BACKENDS:
            raise ValueError(f"backends must be among {BACKENDS}, got {backend!r}")
    for arch in archs:
        if arch not in devices.SM_LIMITS:
            raise ValueError(f"archs must be among {sorted(devices.SM_LIMITS)}, got {arch}")
    rows: List[Dict] = []
    context = multiprocessing.get_context("spawn")
    # Workers are spawned on demand during the run and copy the environment then: keep the interpreter
    # switch out of it until the pool is closed (the initializer clears it again, before any target import).
    interpret = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context,
                                                    initializer=_worker_init) as pool:
            futures = [pool.submit(build_rows, backend, arch, list(cases), sass_dir, timeout_s, verbose)
                       for backend in backends for arch in archs]
            for future in concurrent.futures.as_completed(futures):
                rows += future.result()
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    return sorted(rows, key=_row_key)


def _fmt(value, digits=1, unit=""):
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def _pct(value):
    return "-" if value is None else f"{value:.0%}"


_ESTIMATE_TEXT = """\
Everything below is read from compiled code on a machine without a GPU; nothing is timed. Per build:

- **What is compiled.** Each target builds exactly what its launcher would launch for the case on a GPU (same
  source, arguments, constexprs/specialisations and launch plan). Where the shipped kernel branches between
  roles (backbone planes vs. skip planes), the target also compiles role-specialised variants of the same
  source (Triton: the constexpr role the shipped launch sets to "both"; CUDA: analysis-only `__global__`
  wrappers under `-DFREEU_CODEGEN` calling the same device functions) and the counts come from those.
  Registers, spills and shared memory are those of the shipped kernel.
- **Instructions per element.** SASS instructions one thread executes = the static instructions of the role's
  function, each multiplied by the trip counts (given by the target for the case) of the loops around it
  (natural loops of the control-flow graph). Summed over the threads and programs of every role and divided
  by the output elements: thread-instructions per output element. Left out: both sides of a forward branch
  count (the role split removes the big one), out-of-line subroutines (64-bit division, slow paths) count
  once each, warp-divergence fallbacks (`BRA.DIV` paths) count zero, and divergence, bank conflicts,
  replays, L2 misses and the tail wave are ignored.
- **Widths.** `load_bits_min`/`store_bits_min`: the narrowest width the data moves with. Accesses beyond
  the bytes the op must move (inputs once, output once) are auxiliary (twiddle tables, factors, a scale
  map): the narrowest widths are set aside while their bytes fit in that excess. `*_weighted`: mean width
  per executed instruction, auxiliary ones included. `load_bytes_per_input_byte` > 1 shows the excess:
  auxiliary loads, inputs read twice (two sweeps), or predicated-off lanes (counted as issued).
- **Bytes in flight.** Per thread: global loads issued back to back in one basic block before any
  instruction touches one of their destination registers, averaged over the loaded bytes; times threads
  per block times resident blocks per SM (occupancy from registers, shared memory, threads and the grid).
  Stores are not counted in flight (a thread does not wait for them); every load is taken to go to DRAM
  (re-reads that hit L2 are not told apart), and sector over-fetch of strided accesses is not modelled:
  the model sees instruction widths, not sectors.
- **Modelled fraction of the copy ceiling** (sm_90 builds only: both modelled GPUs are sm_90 parts, so
  sm_80 rows show "-"; a roofline assuming perfect overlap, so an upper bound): `min(1, issue budget /
  instructions per element, bytes in flight per SM / Little's-law requirement)`, with:
"""


def report_markdown(rows: Sequence[Dict], meta: Dict) -> str:
    """report.md: how it is estimated, the budgets, one table per kernel, the failures."""
    lines = ["# Codegen report", ""]
    lines.append(f"Generated {meta.get('date', '')} on {meta.get('host', '')} (no GPU used) by "
                 f"`{meta.get('command', '')}`; triton {meta.get('triton', '?')}, nvcc {meta.get('nvcc', '?')}.")
    lines += ["", "## How it is estimated", "", _ESTIMATE_TEXT + devices.model_text(), ""]
    violations = budgets.check(rows)
    lines += ["## Budgets (issue 10)", ""]
    for budget in budgets.BUDGETS:
        limits = {k: v for k, v in vars(budget).items()
                  if k not in ("name", "cases", "dtypes", "archs") and v is not None and v is not False}
        lines.append(f"- `{budget.name}`: cases {', '.join(budget.cases)}; {'/'.join(budget.dtypes)}; "
                     f"sm_{'/sm_'.join(map(str, budget.archs))}: {limits}")
    lines += ["", f"{len(violations)} violation(s)" + (":" if violations else "."), ""]
    lines += [f"- {text}" for text in violations]
    for backend in sorted({row["backend"] for row in rows}, key=lambda b: BACKENDS.index(b) if b in BACKENDS else 9):
        ok_rows = [row for row in rows if row["backend"] == backend and not row.get("error")]
        lines += ["", f"## {backend} kernel", ""]
        if not ok_rows:
            lines.append("No successful build (see Failures).")
            continue
        lines.append("| case | dtype | sm | regs | spill B | smem B | blocks/SM | instr/elem (by role) | "
                     "ld bits min/mean | st bits min/mean | ld B / input B | bar/tile | in flight KiB/SM | H100 | H200 | "
                     "compile s | budgets |")
        lines.append("|" + "---|" * 17)
        for row in ok_rows:
            by_role = ", ".join(f"{k} {_fmt(v)}" for k, v in row["instructions_per_element_by_role"].items())
            verdict = "ok" if all(v["ok"] for v in row["verdicts"]) else "FAIL " + ", ".join(
                v["budget"] for v in row["verdicts"] if not v["ok"])
            lines.append(
                f"| {row['case']} | {row['dtype']} | {row['arch']} | {row['registers']} | {row['spill_bytes']} | "
                f"{row['shared_bytes']} | {row['blocks_per_sm']} ({row['occupancy_limiter']}) | "
                f"{_fmt(row['instructions_per_element'])} ({by_role}) | {_fmt(row['load_bits_min'], 0)}/"
                f"{_fmt(row['load_bits_weighted'], 0)} | {_fmt(row['store_bits_min'], 0)}/"
                f"{_fmt(row['store_bits_weighted'], 0)} | {_fmt(row['load_bytes_per_input_byte'], 2)} | "
                f"{_fmt(row['barriers_per_tile'])} | "
                f"{_fmt(row['bytes_in_flight_per_sm'] / 1024)} | {_pct(row['modelled_fraction_of_copy_h100'])} | "
                f"{_pct(row['modelled_fraction_of_copy_h200'])} | {_fmt(row['compile_seconds'])} | {verdict} |")
        notes = [(row, text) for row in ok_rows for text in row["notes"]]
        notes += [(row, f"{role['role']}: {role['note']}") for row in ok_rows for role in row["roles"] if role["note"]]
        if notes:
            lines += ["", "Notes:", ""]
            lines += [f"- {row['case']} {row['dtype']} sm_{row['arch']}: {text}" for row, text in notes]
    failures = [row for row in rows if row.get("error")]
    lines += ["", "## Failures", ""]
    if not failures:
        lines.append("None.")
    for row in failures:
        first = row["error"].splitlines()[0]
        lines.append(f"- {row['backend']} {row['case']} {row['dtype']} sm_{row['arch']}: {first}")
    return "\n".join(lines) + "\n"


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def environment_meta(command: str) -> Dict:
    """Date, host, tool versions and the command line, for the report's header."""
    import subprocess

    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": command,
            "host": f"{platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} CPUs",
            "python": sys.version.split()[0]}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = "missing"
    try:
        out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=60).stdout
        meta["nvcc"] = out.strip().splitlines()[-1] if out.strip() else "?"
    except (OSError, subprocess.SubprocessError):
        meta["nvcc"] = "missing"
    return meta


def write_outputs(rows: Sequence[Dict], out_dir: Path, meta: Dict):
    """Write out_dir/report.md and out_dir/results.json; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "report.md"
    js = out_dir / "results.json"
    md.write_text(report_markdown(rows, meta))
    js.write_text(json.dumps(_json_safe({"meta": meta, "rows": list(rows)}), indent=1))
    return md, js
