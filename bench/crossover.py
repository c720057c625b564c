"""Low-rank vs FFT: at which mask size should the op stop using the low-rank filter?

The low-rank filter's work grows with the number of masked frequencies per axis; the FFT's does not.
``freeu_kernels.spec.MAX_LOWRANK_FREQUENCIES_PER_AXIS`` (16) is where the op switches today. This module
times, at thresholds 1..16 for the box and the radial mask, on the same inputs and interleaved:

- ``lowrank[NAME]``: backend NAME's kernel with the cutover lifted, so the low-rank path runs at every
  threshold (past the cutover it would otherwise take the FFT path);
- ``fft``: the torch backend's kernel with the cutover at 0, so every threshold takes its FFT path
  (rfft2, symmetrised gains, irfft2): what the op switches to.

Each is the backend's runner (freeu_kernels.backends.registry.bind) bound while the module constant is
set to the forced cutover (a runner fixes its path when it is bound), then called like the op calls it:
the kernels' time without the op's per-call wrapper, which is the same for both sides. Nothing else in
the package changes (the op's own call plans are untouched). Every output is checked against the
reference before it is timed. The fused kernels (cpu, triton, cuda) hold at most
KERNEL_MAX_FREQUENCIES_PER_AXIS frequencies per axis in registers; thresholds past that are not run on
them and their rows say "not supported by this backend" (the torch backend's low-rank filter has no limit).
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Dict, Iterator, List, Optional, Sequence, TextIO

import torch

import freeu_kernels
from freeu_kernels import spec as freeu_spec
from freeu_kernels.backends import registry

from .cases import SHORT_DTYPE, CrossoverCase
from .names import FFT, NOT_SUPPORTED
from .op_bench import check_output, expected_output, measure_each
from .providers import make_inputs
from .results import find_rows, result_row
from .timing import TimingBudget

__all__ = ["iter_crossover", "summarize_crossover", "frequencies_per_axis", "lowrank_name", "crossover_verdict",
           "KERNEL_MAX_FREQUENCIES_PER_AXIS"]

_NEVER = 1 << 30
# The fused kernels' own bound (csrc: kMaxFrequencies / kMaxAxisFreq), the package's cutover as shipped; read
# once at import, before any measurement moves the module constant.
KERNEL_MAX_FREQUENCIES_PER_AXIS = freeu_spec.MAX_LOWRANK_FREQUENCIES_PER_AXIS


def lowrank_name(backend: str) -> str:
    """'lowrank[torch]' for the torch backend's low-rank filter."""
    return f"lowrank[{backend}]"


@contextlib.contextmanager
def lowrank_cutover(limit: int) -> Iterator[None]:
    """Temporarily set MAX_LOWRANK_FREQUENCIES_PER_AXIS (FreeUSpec.uses_fft_fallback reads it when asked)."""
    saved = freeu_spec.MAX_LOWRANK_FREQUENCIES_PER_AXIS
    freeu_spec.MAX_LOWRANK_FREQUENCIES_PER_AXIS = limit
    try:
        yield
    finally:
        freeu_spec.MAX_LOWRANK_FREQUENCIES_PER_AXIS = saved


def frequencies_per_axis(height: int, width: int, threshold: int, mask: str) -> int:
    """max(ny, nx) of the mask's frequency grid: the quantity the package's cutover compares."""
    band = freeu_spec.frequency_band(height, width, threshold, freeu_spec.Mask(mask))
    return max(band.ny, band.nx)


def _forced_call(inputs, backend: str, limit: int):
    """A call of ``backend``'s kernel with the cutover at ``limit``: its runner (registry.bind) bound on the
    first call with the cutover set, which is when a runner fixes its path (the op's own call plans are
    cached per call key, whatever the cutover, so the op itself cannot be forced this way)."""
    x, h, case = inputs.x, inputs.h, inputs.case
    factor_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # what the op hands a kernel
    b, s = inputs.b_tensor.to(factor_dtype), inputs.s_tensor.to(factor_dtype)
    bound = []

    def call():
        if not bound:
            with lowrank_cutover(limit):
                spec = freeu_spec.make_spec(x, h, case.threshold, mask=case.mask)
                bound.append(registry.bind("torch" if spec.uses_fft_fallback else backend, spec, x, h))
        return bound[0](x, h, b, s, None)

    return call


def _crossover_backends(device: torch.device) -> List[str]:
    # Triton's CPU interpreter is a test tool; its times would say nothing about the kernel.
    return [name for name in freeu_kernels.available_backends(device) if not (name == "triton" and device.type == "cpu")]


def iter_crossover(cases: Sequence[CrossoverCase], device: torch.device, budget: TimingBudget, environment: Dict,
                   *, progress: Optional[TextIO] = sys.stderr) -> Iterator[List[Dict]]:
    """Rows of section "crossover": each low-rank backend and the FFT path at every threshold and mask,
    yielded per (shape, dtype, mask, threshold) point as it finishes."""
    backends = _crossover_backends(device)
    for index, crossover in enumerate(cases, 1):
        started = time.perf_counter()
        inputs = make_inputs(crossover.at(1, "box"), device)
        height, width = crossover.x_shape[-2:]
        for mask in crossover.masks:
            for threshold in crossover.thresholds:
                inputs.case = crossover.at(threshold, mask)
                count = frequencies_per_axis(height, width, threshold, mask)
                supported = [name for name in backends if name == "torch" or count <= KERNEL_MAX_FREQUENCIES_PER_AXIS]
                calls = {lowrank_name(name): _forced_call(inputs, name, _NEVER) for name in supported}
                calls[FFT] = _forced_call(inputs, "torch", 0)
                expected = expected_output(inputs)
                checks, notes = {}, {}
                unsupported = {lowrank_name(name): f"{NOT_SUPPORTED} ({count} frequencies per axis; its kernel "
                                                   f"holds at most {KERNEL_MAX_FREQUENCIES_PER_AXIS})"
                               for name in backends if name not in supported}
                for name, call in list(calls.items()):
                    try:
                        checks[name] = check_output(call(), expected, crossover.dtype)
                    except Exception as error:  # noqa: BLE001 - e.g. a kernel with a frequency limit
                        notes[name] = f"failed: {type(error).__name__}: {error}"[:200]
                        del calls[name]
                timings, errors = measure_each(calls, device, budget)
                notes.update(errors)
                notes.update(unsupported)
                rows = [result_row("crossover", inputs.case, name, "eager", timing, environment,
                                   check=checks.get(name, ""), note=f"{count} frequencies per axis")
                        for name, timing in timings.items()]
                rows += [result_row("crossover", inputs.case, name, "eager", None, environment, note=note)
                         for name, note in notes.items()]
                yield rows
        if progress is not None:
            print(f"[crossover {index}/{len(cases)}] {crossover.title} {crossover.x_shape} "
                  f"{SHORT_DTYPE[crossover.dtype]}: {len(crossover.thresholds)} thresholds x "
                  f"{len(crossover.masks)} masks  [{time.perf_counter() - started:.1f} s]", file=progress, flush=True)


def _clearly_faster(first: Dict, second: Dict) -> bool:
    """first beats second beyond the noise: its 80th percentile is below second's 20th."""
    return first["p80_us"] < second["p20_us"]


def summarize_crossover(rows: Sequence[Dict]) -> List[Dict]:
    """Per (shape, dtype, mask, low-rank backend): where the FFT path starts winning, from measured times.

    ``best_cutover``: the largest frequencies-per-axis count up to which the low-rank median was faster at
    every threshold (what MAX_LOWRANK_FREQUENCIES_PER_AXIS would be set to from medians alone).
    ``lowrank_clear_up_to``: the same with "faster beyond the noise" (low-rank p80 below the FFT p20).
    ``fft_clear_from``: frequencies per axis at the first threshold where the FFT was faster beyond the
    noise (its p80 below the low-rank p20), None if it never was. A cutover in
    [lowrank_clear_up_to, fft_clear_from) is consistent with this measurement.
    """
    crossover_rows = [row for row in rows if row["section"] == "crossover" and row["median_us"] is not None]
    keys = sorted({(row["x_shape"], row["dtype"], row["mask"]) for row in crossover_rows})
    summaries = []
    for x_shape, dtype, mask in keys:
        group = find_rows(crossover_rows, x_shape=x_shape, dtype=dtype, mask=mask)
        fft = {row["threshold"]: row for row in group if row["provider"] == FFT}
        for provider in sorted({row["provider"] for row in group} - {FFT}):
            lowrank = {row["threshold"]: row for row in group if row["provider"] == provider}
            thresholds = sorted(set(lowrank) & set(fft))
            if not thresholds:
                continue
            height, width = (int(d) for d in x_shape.strip("()").split(",")[-2:])
            frequencies = [frequencies_per_axis(height, width, t, mask) for t in thresholds]
            wins = [lowrank[t]["median_us"] <= fft[t]["median_us"] for t in thresholds]
            clear_wins = [_clearly_faster(lowrank[t], fft[t]) for t in thresholds]
            summaries.append({
                "x_shape": x_shape, "dtype": dtype, "mask": mask, "provider": provider,
                "thresholds": thresholds, "frequencies": frequencies,
                "lowrank_us": [lowrank[t]["median_us"] for t in thresholds],
                "fft_us": [fft[t]["median_us"] for t in thresholds],
                "best_cutover": _last_of_leading_run(wins, frequencies),
                "lowrank_clear_up_to": _last_of_leading_run(clear_wins, frequencies),
                "fft_clear_from": next((f for t, f in zip(thresholds, frequencies)
                                        if _clearly_faster(fft[t], lowrank[t])), None),
                "measured_up_to": frequencies[-1],
                "monotone": wins == sorted(wins, reverse=True),
            })
    return summaries


def _last_of_leading_run(flags: Sequence[bool], frequencies: Sequence[int]) -> int:
    """The frequency count at the end of the leading run of True flags (0 when the first is False)."""
    count = 0
    while count < len(flags) and flags[count]:
        count += 1
    return frequencies[count - 1] if count else 0


def crossover_verdict(summaries: Sequence[Dict]) -> List[str]:
    """One sentence per series, then how the package's cutover compares with them (measured facts only)."""
    current = freeu_spec.MAX_LOWRANK_FREQUENCIES_PER_AXIS
    lines = []
    lowrank_past, fft_below = [], []
    for item in summaries:
        where = f"{item['provider']} {item['x_shape']} {item['dtype']} {item['mask']}"
        clear = item["fft_clear_from"]
        text = (f"{where}: low-rank faster up to {item['best_cutover']} frequencies per axis by median "
                f"({item['lowrank_clear_up_to']} beyond the noise); FFT "
                + ("never clearly faster" if clear is None else f"clearly faster from {clear}")
                + f" (measured up to {item['measured_up_to']})")
        if not item["monotone"]:
            text += "; not monotone (the low-rank path wins again past its first loss: noise or a plateau)"
        lines.append(text)
        # Only differences beyond the noise count: low-rank clearly faster past the cutover, or the FFT
        # clearly faster at or below it.
        if item["lowrank_clear_up_to"] > current:
            lowrank_past.append(where)
        elif clear is not None and clear <= current:
            fft_below.append((where, clear))
    if not summaries:
        return lines
    facts = []
    if fft_below:
        facts.append(f"the FFT path was clearly faster at or below it in {len(fft_below)} of {len(summaries)} series "
                     f"(from {min(c for _, c in fft_below)} frequencies per axis)")
    if lowrank_past:
        facts.append(f"the low-rank path was clearly faster past it in {len(lowrank_past)} of {len(summaries)} series")
    summary = "; ".join(facts) if facts else "every series is consistent with it"
    lines.append(f"The op switches to the FFT path past {current} frequencies per axis: {summary} (this device and "
                 "these backends only).")
    return lines
