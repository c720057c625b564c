"""How a time is taken: medians of many repetitions after warm-up, on CPU and on CUDA, eager or graphed.

Method (the same for every provider, so ratios between providers are fair):

- Warm-up first (compilation, cuFFT plans, twiddle caches and allocator pools are built outside the timed
  region), then a short estimate fixes how many repetitions fit the time budget.
- Repetitions are taken in *rounds* that interleave the providers of one case (A B C, B C A, C A B, ...):
  a background process that slows the machine for a while then slows every provider alike instead of
  whichever happened to run at that moment. This matters on a shared CPU.
- CPU: ``time.perf_counter`` around each call. No cache flush: inputs that fit in the last-level cache
  stay cache-resident between repetitions (the report says so).
- CUDA: a pair of CUDA events around each call; before each call a 256 MiB buffer is zeroed so that L2
  (50 MiB on an H100) holds none of the inputs (the same method as ``triton.testing.do_bench``). The
  events are read after a synchronize at the end of each round, so the host never waits inside a round.
  The host time of each call is kept too: the flush lets the host run ahead, so the event time hides
  launch cost unless the host falls behind; a host time above the GPU time means launch-bound.
- CUDA graphs: the provider's call is captured once and the replay is timed the same way; this removes the
  host launch overhead, which dominates small shapes in eager mode.

The statistics are the median and the 20th/80th percentiles of the per-call times.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch

__all__ = [
    "Timing",
    "TimingBudget",
    "measure",
    "capture_cuda_graph",
    "quantile",
    "L2_FLUSH_BYTES",
]

# Several times the L2 of current data-center GPUs (tens of MiB), so zeroing it evicts every input.
L2_FLUSH_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Timing:
    """Per-call time statistics of one provider, in seconds."""

    median_s: float
    p20_s: float
    p80_s: float
    reps: int
    method: str
    # Median of each round's samples: providers timed in the same round saw the same background load, so
    # per-round ratios between them (a paired comparison) are steadier than a ratio of overall medians.
    round_medians_s: Tuple[float, ...] = ()
    # CUDA only: median host time of the call itself (Python, dispatch, launches), not waiting for the GPU.
    host_median_s: Optional[float] = None


@dataclass(frozen=True)
class TimingBudget:
    """How long to spend on one provider of one case, and the bounds on its repetition count."""

    seconds: float = 0.5
    min_reps: int = 5
    max_reps: int = 200
    warmup: int = 2
    rounds: int = 3

    def __post_init__(self):
        if self.seconds <= 0:
            raise ValueError(f"seconds must be > 0, got {self.seconds}")
        if not 1 <= self.min_reps <= self.max_reps:
            raise ValueError(f"min_reps and max_reps must satisfy 1 <= min_reps <= max_reps, got "
                             f"{self.min_reps}, {self.max_reps}")
        if self.warmup < 1:
            raise ValueError(f"warmup must be >= 1 (the first call is never timed), got {self.warmup}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")


def quantile(sorted_values: List[float], q: float) -> float:
    """The q-quantile of already sorted values, interpolating linearly between neighbours (numpy's default)."""
    if not sorted_values:
        raise ValueError("sorted_values must not be empty")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


class _CpuSampler:
    """Per-call wall-clock times with perf_counter; nothing to flush, nothing to synchronise."""

    method = "cpu perf_counter"

    def sample(self, fn: Callable[[], object], count: int) -> Tuple[List[float], List[float]]:
        """(wall times, []) of ``count`` calls: on a CPU the wall time is the host time."""
        times = []
        for _ in range(count):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return times, []


class _CudaSampler:
    """Per-call GPU times with CUDA events, optionally zeroing an L2-sized buffer before each call."""

    def __init__(self, device: torch.device, flush_l2: bool):
        self.device = device
        self.flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device) if flush_l2 else None
        self.method = "cuda events" + (", L2 flushed" if flush_l2 else "")

    def sample(self, fn: Callable[[], object], count: int) -> Tuple[List[float], List[float]]:
        """(GPU times between the events, host times of the calls) of ``count`` calls.

        The flush gives the host a head start, so the GPU time excludes the host's launch cost whenever the
        host keeps ahead; the host time (Python, dispatch, launches) says when it would not.
        """
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
        host = []
        for start, end in zip(starts, ends):
            if self.flush is not None:
                self.flush.zero_()
            start.record()
            begin = time.perf_counter()
            fn()
            host.append(time.perf_counter() - begin)
            end.record()
        torch.cuda.synchronize(self.device)
        return [start.elapsed_time(end) / 1e3 for start, end in zip(starts, ends)], host


def _sampler(device: torch.device, flush_l2: bool):
    if device.type == "cuda":
        return _CudaSampler(device, flush_l2)
    if device.type == "cpu":
        return _CpuSampler()
    raise ValueError(f"device must be cpu or cuda, got {device}")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fns: Mapping[str, Callable[[], object]],
    device: torch.device,
    budget: TimingBudget = TimingBudget(),
    *,
    flush_l2: bool = True,
    method_suffix: str = "",
) -> Dict[str, Timing]:
    """Time every callable in ``fns`` (name -> zero-argument call) on ``device``, interleaved in rounds.

    Each callable is warmed up ``budget.warmup`` times, its cost estimated from a few more calls, and then
    called ``clamp(budget.seconds / estimate, min_reps, max_reps)`` times in total, spread over
    ``budget.rounds`` rounds whose provider order rotates. ``flush_l2`` only matters on CUDA.
    """
    device = torch.device(device)
    if not fns:
        return {}
    sampler = _sampler(device, flush_l2)
    names = list(fns)
    reps: Dict[str, int] = {}
    for name in names:
        for _ in range(budget.warmup):
            fns[name]()
        _synchronize(device)
        # The estimate itself is one round's worth of samples, so a very slow provider is not run twice
        # as often as its budget allows.
        estimate = min(sampler.sample(fns[name], 2)[0])
        reps[name] = int(min(budget.max_reps, max(budget.min_reps, budget.seconds / max(estimate, 1e-7))))
    rounds: Dict[str, List[List[float]]] = {name: [] for name in names}
    host: Dict[str, List[float]] = {name: [] for name in names}
    for round_index in range(budget.rounds):
        order = names[round_index % len(names):] + names[: round_index % len(names)]
        for name in order:
            # At least one call per round, so every provider has a sample in every round.
            done = sum(len(samples) for samples in rounds[name])
            wanted = max(1, math.ceil(reps[name] * (round_index + 1) / budget.rounds) - done)
            times, host_times = sampler.sample(fns[name], wanted)
            rounds[name].append(times)
            host[name] += host_times
    method = sampler.method + method_suffix
    results = {}
    for name in names:
        ordered = sorted(sample for samples in rounds[name] for sample in samples)
        results[name] = Timing(
            median_s=quantile(ordered, 0.5),
            p20_s=quantile(ordered, 0.2),
            p80_s=quantile(ordered, 0.8),
            reps=len(ordered),
            method=method,
            round_medians_s=tuple(quantile(sorted(samples), 0.5) for samples in rounds[name]),
            host_median_s=quantile(sorted(host[name]), 0.5) if host[name] else None,
        )
    return results


def capture_cuda_graph(fn: Callable[[], object], warmup: int = 3) -> Callable[[], None]:
    """Capture one call of ``fn`` in a CUDA graph and return a zero-argument replay.

    The warm-up runs on a side stream (as torch.cuda.graphs requires) so lazily created state (cuFFT plans,
    caches, compiled kernels) exists before capture. Raises whatever the capture raises: an op that copies
    from host memory or synchronises cannot be captured, and the caller reports that instead of a time.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


def format_seconds(seconds: float) -> str:
    """A duration with a unit that keeps 3 significant digits: 812 us, 1.23 ms, 2.40 s."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.3g} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"
