"""Op level: every provider on every case, checked against the reference, timed eager and (CUDA) graphed."""

from __future__ import annotations

import sys
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, TextIO, Tuple

import torch

import freeu_kernels

from .cases import Case
from .memory import CallProfile, profile_call
from .names import DIFFUSERS, TORCH_CAT, fused_provider_name
from .providers import CaseInputs, Prepared, Provider, default_backend, make_inputs
from .results import result_row
from .timing import Timing, TimingBudget, capture_cuda_graph, format_seconds, measure

__all__ = ["iter_op_cases", "check_output", "expected_output", "measure_each", "profile_columns", "TOLERANCE",
           "GRAPH_MAX_BYTES"]

# Max |error| / max(1, max |expected|) a FreeU provider may show against the float32 reference: a few
# rounding steps of the dtype (outputs are rounded once; the reference scales x in the dtype itself).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}

# Cases up to this size are also timed under CUDA graphs: where launch overhead can matter. Above it a
# launch costs under 5% of the transfer even at HBM speed.
GRAPH_MAX_BYTES = 64 * 2**20


def expected_output(inputs: CaseInputs) -> torch.Tensor:
    """The official FFT path computed in float32 on the case's inputs (the check's oracle)."""
    case = inputs.case
    return freeu_kernels.fused_concat_reference(inputs.x.float(), inputs.h.float(), inputs.b, inputs.s,
                                                case.threshold, mask=case.mask)


def check_output(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> str:
    """'ok', or 'MISMATCH ...' when the output's shape or values are off by more than TOLERANCE[dtype]."""
    if tuple(out.shape) != tuple(expected.shape):
        return f"MISMATCH shape {tuple(out.shape)} != {tuple(expected.shape)}"
    error = (out.float() - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    if error <= TOLERANCE[dtype] * scale:  # a NaN error fails this comparison too
        return "ok"
    return f"MISMATCH max|err| {error:.3g} (tolerance {TOLERANCE[dtype] * scale:.3g})"


def _describe_error(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".replace("\n", " ")
    return text if len(text) <= 200 else text[:197] + "..."


def measure_each(calls: Dict[str, Callable[[], object]], device: torch.device, budget: TimingBudget,
                 **options) -> Tuple[Dict[str, Timing], Dict[str, str]]:
    """``measure`` on all calls at once (interleaved); if one raises mid-run, each is measured alone so one
    broken provider costs only its own row. Returns (timings, errors by name)."""
    try:
        return measure(calls, device, budget, **options), {}
    except Exception:  # noqa: BLE001 - find which provider failed, below
        pass
    timings, errors = {}, {}
    for name, call in calls.items():
        try:
            timings.update(measure({name: call}, device, budget, **options))
        except Exception as error:  # noqa: BLE001 - recorded in the row's note
            errors[name] = "timing failed: " + _describe_error(error)
    return timings, errors


def profile_columns(call: Callable[[], object], device: torch.device) -> Dict:
    """peak_extra_bytes and aten_ops of one untimed call (bench/memory.py); empty if profiling fails."""
    try:
        measured: CallProfile = profile_call(call, device)
    except Exception:  # noqa: BLE001 - the timing row stands without its memory columns
        return {}
    return {"peak_extra_bytes": measured.peak_extra_bytes, "aten_ops": measured.aten_ops}


def _prepare_all(inputs: CaseInputs, providers: Sequence[Provider], device: torch.device
                 ) -> Tuple[Dict[str, Prepared], Dict[str, str], Dict[str, str], Dict[str, Dict]]:
    """Prepare each provider, run it once against the oracle and once under the memory profiler.
    Returns (ready, checks, notes, profile columns by provider)."""
    ready, checks, notes, profiles = {}, {}, {}, {}
    expected: Optional[torch.Tensor] = None
    for provider in providers:
        reason = provider.unavailable(inputs.case, device)
        if reason is not None:
            notes[provider.name] = "skipped: " + reason
            continue
        try:
            prepared = provider.prepare(inputs)
            out = prepared.call()  # the first call: compiles, builds caches; checked, never timed
            if provider.computes_freeu:
                if expected is None:
                    expected = expected_output(inputs)
                checks[provider.name] = check_output(prepared.to_case_layout(out), expected, inputs.case.dtype)
            del out
        except Exception as error:  # noqa: BLE001 - a failing provider is a result, not a crash
            notes[provider.name] = "failed: " + _describe_error(error)
            continue
        ready[provider.name] = prepared
        profiles[provider.name] = profile_columns(prepared.call, device)
    return ready, checks, notes, profiles


def _graph_calls(ready: Dict[str, Prepared], notes: Dict[str, str]) -> Dict[str, Callable[[], None]]:
    graphed = {}
    for name, prepared in ready.items():
        try:
            graphed[name] = capture_cuda_graph(prepared.call)
        except Exception as error:  # noqa: BLE001 - e.g. a host copy inside the op; reported per row
            notes[name] = "graph capture failed: " + _describe_error(error)
            try:
                torch.cuda.synchronize()
            except RuntimeError:  # a capture that failed mid-way may leave its error to the next sync
                pass
    return graphed


def _progress_line(index: int, total: int, case: Case, timings: Dict[str, Timing], seconds: float,
                   default: Optional[str]) -> str:
    parts = [f"{name} {format_seconds(t.median_s)}" for name, t in timings.items()]
    default_name = None if default is None else fused_provider_name(default)
    if default_name in timings:
        best_name, best = default_name, timings[default_name]
        ratios = []
        if DIFFUSERS in timings:
            ratios.append(f"{timings[DIFFUSERS].median_s / best.median_s:.1f}x faster than diffusers")
        if TORCH_CAT in timings:
            ratios.append(f"{best.median_s / timings[TORCH_CAT].median_s:.2f}x torch.cat")
        parts.append(f"=> default {best_name}: " + ", ".join(ratios))
    return (f"[{index}/{total}] {case.label} ({case.bytes_moved / 1e6:.1f} MB): " + " | ".join(parts)
            + f"  [{seconds:.1f} s]")


def iter_op_cases(cases: Sequence[Case], providers: Sequence[Provider], device: torch.device,
                  budget: TimingBudget, environment: Dict, *, graphs: bool = True,
                  progress: Optional[TextIO] = sys.stderr) -> Iterator[List[Dict]]:
    """Time every provider on every case; yield each case's rows (one per provider and mode) as it finishes."""
    for index, case in enumerate(cases, 1):
        started = time.perf_counter()
        rows: List[Dict] = []
        inputs = make_inputs(case, device)
        ready, checks, notes, profiles = _prepare_all(inputs, providers, device)
        default = {"default_backend": default_backend(inputs)}
        timings, errors = measure_each({name: p.call for name, p in ready.items()}, device, budget)
        notes.update(errors)
        modes = [("eager", timings)]
        if graphs and device.type == "cuda" and case.bytes_moved <= GRAPH_MAX_BYTES:
            graph_notes: Dict[str, str] = {}
            graphed = _graph_calls(ready, graph_notes)
            graph_timings, graph_errors = measure_each(graphed, device, budget, method_suffix=", CUDA graph")
            graph_notes.update(graph_errors)
            modes.append(("graph", graph_timings))
            rows += [result_row("op", case, p.name, "graph", None, environment, note=graph_notes[p.name], **default)
                     for p in providers if p.name in graph_notes]
            del graphed
        for mode, mode_timings in modes:
            # Memory and op counts are of an eager call; a graph replay allocates from the graph's own pool.
            rows += [result_row("op", case, name, mode, timing, environment, check=checks.get(name, ""),
                                **(profiles.get(name, {}) if mode == "eager" else {}), **default)
                     for name, timing in mode_timings.items()]
        rows += [result_row("op", case, p.name, "eager", None, environment, note=notes[p.name], **default)
                 for p in providers if p.name in notes]
        if progress is not None:
            print(_progress_line(index, len(cases), case, timings, time.perf_counter() - started,
                                 default["default_backend"]), file=progress, flush=True)
        del ready, inputs
        yield rows
