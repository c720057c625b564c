"""The fixed cost of one call: every backend on a tiny input, against torch.cat and a trivial custom op.

On a (1, 4, 8, 8) + (1, 4, 8, 8) float32 input the arithmetic is a few hundred flops, so a call's time is
its fixed cost: Python argument handling, validation, the backend choice, the custom op's dispatch, ctypes
argument packing or kernel launches. Timed in the same run and interleaved (bench/timing.py):

- ``torch.cat``: one aten op, the floor of any concat;
- ``trivial custom_op``: ``freeu_bench::trivial_cat``, a ``torch.library.custom_op`` with a fake and an
  autograd formula whose body is ``torch.cat``: what the custom-op machinery alone costs per call, the
  yardstick the per-call budget (<= 2x, bench/report.py) is stated against;
- ``freeu_kernels[NAME]``: ``fused_concat(x, h, b, s, backend=NAME)`` with b, s 0-d float32 tensors on the
  device, for every backend that runs here (Triton's CPU interpreter is not timed). This is the main row:
  the diffusers integration passes its factors this way (freeu_kernels/integrations/diffusers.py keeps
  them as 0-d float32 tensors on the U-Net's device, so a schedule changes them without recompiling);
- ``freeu_kernels[NAME] via torch.ops``: ``torch.ops.freeu.fused_concat(x, h, b, s, backend=NAME)``, the
  same factors, the schema's defaults otherwise: the op through the dispatcher, what a traced graph or
  a user calling the op runs (fused_concat's eager fast path does not apply there);
- ``freeu_kernels[NAME] with float factors``: ``fused_concat(x, h, 1.3, 0.9)``, Python floats and no
  backend named (the automatic choice, which picks NAME), for the default backend only: a hand-written
  call with plain numbers (memoised factor tensors on the fast path).

Each row also carries ``aten_ops`` (the operators one call issues, counted under the profiler, i.e. on
the op's full path) and ``peak_extra_bytes``. On CUDA the ratios use the host time of a call: on a tiny
input the GPU side is launch latency, the host side is what costs.
"""

from __future__ import annotations

import sys
from typing import Dict, List, Optional, Sequence, TextIO

import torch

import freeu_kernels

from .cases import Case
from .names import FLOAT_FACTORS, TORCH_CAT, TRIVIAL_OP, VIA_DISPATCHER, fused_backend, fused_provider_name
from .op_bench import measure_each, profile_columns
from .providers import CaseInputs, Provider, default_backend, is_fused, make_inputs
from .results import result_row
from .timing import TimingBudget, format_seconds

__all__ = ["run_overhead", "trivial_cat", "OVERHEAD_CASE", "OVERHEAD_BUDGET"]

OVERHEAD_CASE = Case((1, 4, 8, 8), (1, 4, 8, 8), torch.float32, ("overhead",), "tiny input: fixed cost per call")
# Calls of a few microseconds: many repetitions, many rounds, still well under a second per provider.
OVERHEAD_BUDGET = TimingBudget(seconds=0.1, min_reps=50, max_reps=2000, warmup=10, rounds=7)


@torch.library.custom_op("freeu_bench::trivial_cat", mutates_args=())
def trivial_cat(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """cat([x, h], 1) behind the custom-op machinery (schema, dispatch, fake, autograd): nothing else."""
    return torch.cat([x, h], dim=1)


@trivial_cat.register_fake
def _trivial_cat_fake(x, h):
    return x.new_empty((x.shape[0], x.shape[1] + h.shape[1]) + tuple(x.shape[2:]))


def _trivial_cat_setup(ctx, inputs, output):
    ctx.cx = inputs[0].shape[1]


def _trivial_cat_backward(ctx, grad):
    return grad[:, :ctx.cx], grad[:, ctx.cx:]


trivial_cat.register_autograd(_trivial_cat_backward, setup_context=_trivial_cat_setup)


def _dispatcher_call(inputs: CaseInputs, backend: str):
    """``torch.ops.freeu.fused_concat`` called directly: the schema's keyword form, default options."""
    x, h, b, s = inputs.x, inputs.h, inputs.b_tensor, inputs.s_tensor
    return lambda: torch.ops.freeu.fused_concat(x, h, b, s, backend=backend)


def _float_factor_call(inputs: CaseInputs):
    """``fused_concat(x, h, 1.3, 0.9)``: Python-float factors, no backend named (the automatic choice)."""
    x, h, b, s = inputs.x, inputs.h, inputs.b, inputs.s
    return lambda: freeu_kernels.fused_concat(x, h, b, s)


def run_overhead(providers: Sequence[Provider], device: torch.device, environment: Dict, *,
                 budget: TimingBudget = OVERHEAD_BUDGET, progress: Optional[TextIO] = sys.stderr) -> List[Dict]:
    """Rows of section "overhead": torch.cat, the trivial custom op, and each freeu_kernels backend through
    fused_concat and through torch.ops (plus Python-float factors on the default backend)."""
    case = OVERHEAD_CASE
    inputs = make_inputs(case, device)
    x, h = inputs.x, inputs.h
    calls = {TORCH_CAT: lambda: torch.cat([x, h], dim=1), TRIVIAL_OP: lambda: torch.ops.freeu_bench.trivial_cat(x, h)}
    notes = {}
    chosen = default_backend(inputs)
    for provider in providers:
        if not is_fused(provider.name):
            continue
        backend = fused_backend(provider.name)
        dispatcher = fused_provider_name(backend, VIA_DISPATCHER)
        reason = provider.unavailable(case, device)
        if reason is not None:
            notes[provider.name] = notes[dispatcher] = "skipped: " + reason
            continue
        calls[provider.name] = provider.prepare(inputs).call
        calls[dispatcher] = _dispatcher_call(inputs, backend)
        if backend == chosen:
            calls[fused_provider_name(backend, FLOAT_FACTORS)] = _float_factor_call(inputs)
    for call in calls.values():
        call()  # first calls build caches (twiddle tables, dispatch): not what a call costs afterwards
    profiles = {name: profile_columns(call, device) for name, call in calls.items()}
    timings, errors = measure_each(calls, device, budget, flush_l2=False)
    notes.update(errors)
    extra = {"default_backend": chosen}
    rows = [result_row("overhead", case, name, "eager", timing, environment, **profiles.get(name, {}), **extra)
            for name, timing in timings.items()]
    rows += [result_row("overhead", case, name, "eager", None, environment, note=note, **extra)
             for name, note in notes.items()]
    if progress is not None:
        print("[overhead] (1,4,8,8)x2 fp32: " + " | ".join(
            f"{name} {format_seconds(t.host_median_s if t.host_median_s is not None else t.median_s)}"
            for name, t in timings.items()), file=progress, flush=True)
    return rows
