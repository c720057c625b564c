"""What one call allocates and how many operators it issues, measured on one untimed call.

Peak extra memory (``peak_extra_bytes``): the highest amount of memory the call holds at any moment
above what was allocated when it started (the inputs, the model), so its output counts and its inputs
do not. torch.cat's value is therefore its output; a fused FreeU should show the same.

- CUDA: ``torch.cuda.reset_peak_memory_stats`` before the call, then ``max_memory_allocated`` after it,
  minus ``memory_allocated`` before it (the caching allocator's own accounting, exact per allocation).
- CPU: the profiler's memory events (``profile_memory=True``), one per allocation (+bytes) and per free
  (-bytes) in time order; the peak of their running sum. A plain sum of the allocations would count a
  temporary that is freed before the next one is made twice; the running sum counts what is held at once.

Operators per call (``aten_ops``): the ``aten::`` operators the call issues itself, from the profiler's
op tree: ops whose ancestors are not ``aten::`` ops (the ones Python code and the custom op's kernel
call), not the ops those decompose into. On an accelerator each of them is at least one launch; on a CPU
each compute op is a parallel region.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Tuple

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["CallProfile", "profile_call", "peak_of_running_sum", "issued_aten_ops", "METHODS"]

# How peak_extra_bytes is measured, per device type (the report quotes these).
METHODS = {
    "cuda": "torch.cuda.reset_peak_memory_stats / max_memory_allocated around one call, minus memory_allocated "
            "before it",
    "cpu": "torch.profiler memory events of one call (profile_memory=True), the peak of the running sum of "
           "allocations minus frees",
}


@dataclass(frozen=True)
class CallProfile:
    """Memory and operator counts of one call."""

    peak_extra_bytes: int
    # CPU only: every allocation and free of the call in time order (+bytes / -bytes); () on CUDA.
    memory_events: Tuple[int, ...]
    aten_ops: Optional[int]
    method: str

    @property
    def allocations(self) -> Tuple[int, ...]:
        """The sizes of the call's allocations in order (CPU only)."""
        return tuple(size for size in self.memory_events if size > 0)


def peak_of_running_sum(events) -> int:
    """max(0, max over prefixes of sum(events)): the most bytes held at once above the starting point."""
    held = peak = 0
    for size in events:
        held += size
        peak = max(peak, held)
    return peak


def issued_aten_ops(function_events) -> int:
    """aten:: ops in the profile whose ancestors are not aten:: ops (see the module docstring)."""
    count = 0
    for event in function_events:
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        count += parent is None
    return count


def _cpu_memory_events(prof) -> Tuple[int, ...]:
    # The per-allocation events with their timestamps are in the kineto results; the FunctionEvent list
    # only carries per-op totals (which cannot give a peak).
    events = [event for event in prof.profiler.kineto_results.events()
              if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda event: event.start_ns())
    return tuple(int(event.nbytes()) for event in events)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2: some torch builds' profiler prints a line to it at every start and stop,
    which would bury the progress lines. Used around starting and stopping only, never around the call."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no usable descriptor 2 (an embedded interpreter): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _profiled(fn: Callable[[], object], profile_memory: bool):
    """(profiler, result of fn) with the profiler started and stopped quietly around one call of fn."""
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=profile_memory)
    with _quiet_stderr():
        prof.__enter__()
    try:
        result = fn()
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    return prof, result


def profile_call(fn: Callable[[], object], device: torch.device, *, count_ops: bool = True) -> CallProfile:
    """Run ``fn`` once and return its peak extra memory on ``device`` and (``count_ops``) its aten ops.

    The result of ``fn`` is kept until the measurement ends, so its own free is not seen. On CUDA the op
    count comes from a second call under the profiler (CPU activity only), after the memory call.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        ops = None
        if count_ops:
            prof, result = _profiled(fn, profile_memory=False)
            del result
            ops = issued_aten_ops(prof.events())
        return CallProfile(max(0, peak), (), ops, METHODS["cuda"])
    if device.type != "cpu":
        raise ValueError(f"device must be cpu or cuda, got {device}")
    prof, result = _profiled(fn, profile_memory=True)
    del result
    events = _cpu_memory_events(prof)
    ops = issued_aten_ops(prof.events()) if count_ops else None
    return CallProfile(peak_of_running_sum(events), events, ops, METHODS["cpu"])
