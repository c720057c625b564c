"""Stage 3 of tools/gpu_verify.sh: op timing of the fused backends against torch.cat, a copy and the FFT path.

    python tools/gpu_op_bench.py --out op_timing.jsonl [--dry-run]

Providers, on the same inputs (b and s 0-d tensors on the device, the graph-safe way to pass them):
  freeu[cuda], freeu[triton], freeu[torch]   freeu_kernels.fused_concat(x, h, b, s, backend=NAME)
  torch.cat                                  torch.cat([x, h], 1): the same bytes, no FreeU (the floor)
  copy                                       dst.copy_(src), src as large as the output: the same bytes
                                             read and written in one kernel (the practical ceiling)
  reference                                  freeu_kernels.fused_concat_reference in the model dtype: the
                                             official / diffusers FFT code path in pure torch (diffusers is
                                             not needed; it computes the FFT in float32, as diffusers does for
                                             bf16 and for planes that are not powers of two)
Shapes: SDXL (2,640,64,64)+640, (2,1280,32,32)+1280, (2,1280,32,32)+640 and SD 1.5 (2,1280,8,8)+1280, in
fp16 and bf16 (the same specialisations stage 2 compiled, so no Triton compile happens here).

Bytes counted per call: 2 (|x| + |h|) elements (x and h read once, the output written once).
Modes, each one JSON row per (shape, dtype, provider, mode) written as soon as the shape is done:
  eager  CUDA events around each call, L2 flushed (a buffer of 2x L2 zeroed) before every call; median,
         20th and 80th percentile;
  graph  one CUDA graph holding max(16, sets) calls over rotated input sets (enough sets that a set comes
         back only after >= 3x L2 of other inputs, at most 64), replayed after an L2 flush, so no call
         finds its inputs in L2; time per call = replay time / calls. Removes launch gaps: the small
         shapes are launch-bound in eager mode;
  loop   50 back-to-back eager calls over the rotated sets, host clock, one synchronisation at the end:
         what a U-Net without graphs pays per call (host overhead or GPU time, whichever is larger).
Ratios use the same mode: pct_of_copy = copy time / time, vs_torch_cat = time / torch.cat time,
speedup_vs_reference = reference time / time. Memory (eager row): one call on resident inputs,
``extra_peak_bytes`` = peak allocated during the call minus what stays allocated after it (the output),
via torch.cuda.reset_peak_memory_stats / max_memory_allocated; ``out_bytes`` = what stays.
A ``kind: "ceiling"`` line first: a 1 GiB device-to-device copy, GB/s counting bytes read plus written.
Then ``kind: "overhead"`` lines: the host time per call on a tiny input, each backend through fused_concat
and through torch.ops, against torch.cat and a trivial custom op (overhead()).
In a dry run (CPU) the same code runs on tiny shapes with the host clock; there are no graph or memory rows.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import gpu_common  # tools/ is sys.path[0] when run as a script
from gpu_common import DTYPES, JsonLines, Target

import torch  # noqa: E402

SHAPES = [  # label, x shape, Ch, dry-run x shape, dry-run Ch
    ("sdxl_64x64", (2, 640, 64, 64), 640, (1, 2, 8, 8), 2),
    ("sdxl_32x32", (2, 1280, 32, 32), 1280, (1, 4, 8, 8), 4),
    ("sdxl_32x32_cx_ne_ch", (2, 1280, 32, 32), 640, (1, 4, 8, 8), 2),
    ("sd15_8x8", (2, 1280, 8, 8), 1280, (1, 4, 4, 4), 4),
]
BASELINES = ("copy", "torch.cat", "reference")
B, S = 1.3, 0.6
GRAPH_MIN_CALLS = 16
LOOP_CALLS = 50


def percentile(values: List[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class Timer:
    """Per-call times in microseconds: CUDA events with an L2 flush before each call, or the host clock on CPU."""

    def __init__(self, target: Target, reps: int, warmup: int):
        self.target, self.reps, self.warmup = target, reps, warmup
        self.flush = None
        if target.is_cuda:
            l2 = torch.cuda.get_device_properties(0).L2_cache_size
            self.flush = torch.empty(max(2 * l2, 256 << 20), dtype=torch.int8, device="cuda")

    def flush_l2(self) -> None:
        """Evicts L2 by writing a buffer twice its size (no-op on CPU)."""
        if self.flush is not None:
            self.flush.zero_()

    def per_call(self, fn: Callable[[], object], reps: Optional[int] = None) -> List[float]:
        """Times of ``reps`` calls of ``fn`` after the warm-up calls."""
        reps = reps or self.reps
        for _ in range(self.warmup):
            fn()
        self.target.synchronize()
        if not self.target.is_cuda:
            times = []
            for _ in range(reps):
                started = time.perf_counter()
                fn()
                times.append((time.perf_counter() - started) * 1e6)
            return times
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            self.flush_l2()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]


def summary(times: List[float], mode: str, calls_per_sample: int = 1) -> Dict:
    """median / p20 / p80 per call in microseconds."""
    per = [t / calls_per_sample for t in times]
    return dict(mode=mode, median_us=statistics.median(per), p20_us=percentile(per, 20), p80_us=percentile(per, 80),
                reps=len(per), calls_per_sample=calls_per_sample)


def graph_of(calls: List[Callable[[], object]]) -> Callable[[], None]:
    """The calls captured in one CUDA graph (after a warm-up on a side stream); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls[: min(len(calls), 4)]:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()  # once untimed: the first replay uploads the graph
    torch.cuda.synchronize()
    return graph.replay


def memory_of(fn: Callable[[], object]) -> Dict:
    """Peak transient memory of one call on resident inputs: peak during the call minus what the call keeps."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    peak, kept = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
    del result
    return dict(extra_peak_bytes=peak - kept, out_bytes=kept - base)


def providers_for(target: Target, inputs, b, s) -> Dict[str, Callable[[int], object]]:
    """name -> fn(i) running on input set i (i indexes the rotated sets)."""
    import freeu_kernels

    numel = inputs[0][0].numel() + inputs[0][1].numel()
    dtype, device = inputs[0][0].dtype, inputs[0][0].device
    copies = [(torch.randn(numel, device=device).to(dtype), torch.empty(numel, dtype=dtype, device=device))
              for _ in inputs]
    table = {
        "copy": lambda i: copies[i][1].copy_(copies[i][0]),
        "torch.cat": lambda i: torch.cat(inputs[i], dim=1),
        "reference": lambda i: freeu_kernels.fused_concat_reference(inputs[i][0], inputs[i][1], B, S),
    }
    for backend in ("cuda", "triton", "torch"):
        if target.why_unavailable(backend) is None:
            kernel = target.kernel(backend)
            table[f"freeu[{backend}]"] = (lambda k: lambda i: k(inputs[i][0], inputs[i][1], b, s))(kernel)
    return table


def bench_shape(label, xshape, ch, dtype_name, target: Target, timer: Timer, out: JsonLines, l2_bytes: int) -> None:
    """Every provider on one shape and dtype; writes that shape's rows when it is done."""
    dtype = DTYPES[dtype_name]
    x0, h0 = gpu_common.random_inputs(xshape, ch, dtype, target.device)
    in_bytes = (x0.numel() + h0.numel()) * x0.element_size()
    sets = 1 if not target.is_cuda else max(2, min(64, math.ceil(3 * l2_bytes / max(in_bytes, 1))))
    inputs = [(x0, h0)] + [gpu_common.random_inputs(xshape, ch, dtype, target.device, seed=i) for i in range(1, sets)]
    b = torch.tensor(B, dtype=torch.float32, device=target.device)
    s = torch.tensor(S, dtype=torch.float32, device=target.device)
    table = providers_for(target, inputs, b, s)
    common = dict(kind="timing", shape=label, dtype=dtype_name, x_shape=list(xshape), h_shape=[xshape[0], ch, *xshape[2:]],
                  bytes=2 * in_bytes, input_sets=sets)
    reference_out = table["reference"](0).float()
    rows: List[Dict] = []
    for name, fn in table.items():
        base = dict(common, provider=name)
        try:
            check = None
            if name.startswith("freeu["):
                got = fn(0).float()
                check = ((got - reference_out).abs().max() / reference_out.abs().max().clamp_min(1e-30)).item()
            counter = iter(range(1 << 62))
            eager = dict(base, **summary(timer.per_call(lambda: fn(next(counter) % sets)), "eager"), check_vs_reference=check)
            if target.is_cuda:
                eager.update(memory_of(lambda: fn(0)))
            rows.append(eager)
            loop_calls = LOOP_CALLS if target.is_cuda else 1
            started = time.perf_counter()
            for i in range(loop_calls):
                fn(i % sets)
            target.synchronize()
            rows.append(dict(base, **summary([(time.perf_counter() - started) * 1e6], "loop", loop_calls)))
            if target.is_cuda:
                try:
                    calls = max(sets, GRAPH_MIN_CALLS)
                    replay = graph_of([(lambda k: lambda: fn(k % sets))(k) for k in range(calls)])
                    rows.append(dict(base, **summary(timer.per_call(replay, reps=max(5, timer.reps // 10)), "graph", calls)))
                except Exception as error:  # noqa: BLE001 - a provider that cannot be captured keeps its eager row
                    rows.append(dict(base, mode="graph", error=f"{type(error).__name__}: {error}"[:300]))
        except Exception as error:  # noqa: BLE001 - a failing provider is a result, not the end of the stage
            rows.append(dict(base, mode="eager", error=f"{type(error).__name__}: {error}"[:300]))
    by_mode: Dict[str, Dict[str, float]] = {}
    for row in rows:
        if "median_us" in row:
            by_mode.setdefault(row["mode"], {})[row["provider"]] = row["median_us"]
    for row in rows:
        if "median_us" not in row:
            out.write(row)
            continue
        same = by_mode[row["mode"]]
        us = row["median_us"]
        row["gbps"] = row["bytes"] / us / 1e3 if us > 0 else None
        row["pct_of_copy"] = 100.0 * same["copy"] / us if "copy" in same and us > 0 else None
        row["vs_torch_cat"] = us / same["torch.cat"] if "torch.cat" in same and same["torch.cat"] > 0 else None
        row["speedup_vs_reference"] = same["reference"] / us if "reference" in same and us > 0 else None
        out.write(row)
    del inputs, table
    if target.is_cuda:
        torch.cuda.empty_cache()


def ceiling(target: Target, timer: Timer, out: JsonLines) -> None:
    """The device-to-device copy rate on a large buffer (bytes read plus written), for context."""
    numel = (1 << 29) if target.is_cuda else (1 << 20)
    src = torch.randn(numel // 2, device=target.device).to(torch.float16).repeat(2)
    dst = torch.empty_like(src)
    times = timer.per_call(lambda: dst.copy_(src), reps=20)
    us = statistics.median(times)
    out.write(dict(kind="ceiling", provider="copy", bytes=2 * src.numel() * src.element_size(), median_us=us,
                   gbps=2 * src.numel() * src.element_size() / us / 1e3))


OVERHEAD_SHAPE = (1, 4, 8, 8)  # x and h: a call's time is its fixed cost (bench/overhead.py's case)
OVERHEAD_CALLS, OVERHEAD_ROUNDS = 200, 7


def overhead(target: Target, out: JsonLines) -> None:
    """Host time per call on a tiny input: each fused backend through fused_concat (0-d device factors,
    as the diffusers integration passes them) and through torch.ops.freeu.fused_concat (the dispatcher),
    against torch.cat and a trivial torch.library.custom_op (bench/overhead.py's yardstick), interleaved.

    The time is the host's: OVERHEAD_CALLS calls issued back to back, the clock stopped before the one
    synchronisation that follows (a tiny call's GPU side is a few microseconds of launch latency, queued
    behind the host). Median over OVERHEAD_ROUNDS rounds; ``vs_trivial_op`` is issue 15's ratio (<= 2x).
    """
    import freeu_kernels
    from bench.overhead import trivial_cat

    x = torch.randn(OVERHEAD_SHAPE, device=target.device)
    h = torch.randn(OVERHEAD_SHAPE, device=target.device)
    b = torch.tensor(B, dtype=torch.float32, device=target.device)
    s = torch.tensor(S, dtype=torch.float32, device=target.device)
    calls: Dict[str, Callable[[], object]] = {
        "torch.cat": lambda: torch.cat([x, h], dim=1),
        "trivial custom_op": lambda: trivial_cat(x, h),
    }
    for backend in ("cuda", "triton", "torch"):
        if target.why_unavailable(backend) is not None or (target.dry_run and backend == "cuda"):
            continue  # the dry run's cuda is the emulator, not the op: no overhead of the package to time
        calls[f"freeu[{backend}]"] = (lambda n: lambda: freeu_kernels.fused_concat(x, h, b, s, backend=n))(backend)
        calls[f"freeu[{backend}] via torch.ops"] = (
            lambda n: lambda: torch.ops.freeu.fused_concat(x, h, b, s, backend=n))(backend)
    calls_per_round = 3 if target.dry_run else OVERHEAD_CALLS
    samples: Dict[str, List[float]] = {name: [] for name in calls}
    for call in calls.values():
        call()  # first calls build the plans and caches
    target.synchronize()
    for _ in range(1 if target.dry_run else OVERHEAD_ROUNDS):
        for name, call in calls.items():
            started = time.perf_counter()
            for _ in range(calls_per_round):
                call()
            samples[name].append((time.perf_counter() - started) * 1e6 / calls_per_round)
            target.synchronize()
    trivial = statistics.median(samples["trivial custom_op"])
    for name, times in samples.items():
        us = statistics.median(times)
        out.write(dict(kind="overhead", provider=name, x_shape=list(OVERHEAD_SHAPE), dtype="fp32", host_us=us,
                       vs_trivial_op=us / trivial if trivial > 0 else None, calls_per_round=calls_per_round,
                       rounds=len(times)))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpu_common.parse_args_common(parser)
    parser.add_argument("--dtypes", help="comma list of fp16,bf16,fp32 (default fp16,bf16; a dry run: fp16)")
    parser.add_argument("--reps", type=int, default=100, help="eager repetitions per provider (default 100)")
    args = parser.parse_args(argv)
    target = Target(args.dry_run)
    out = JsonLines(args.out)
    torch.manual_seed(0)
    timer = Timer(target, reps=3 if args.dry_run else args.reps, warmup=1 if args.dry_run else 5)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size if target.is_cuda else 0
    method = ("CUDA events, L2 flushed before each call; graph: rotated input sets >= 3x L2" if target.is_cuda
              else "dry run: host clock on CPU tensors (Triton interpreter, CUDA emulator); no meaning as timing")
    out.write(dict(kind="meta", device=torch.cuda.get_device_name(0) if target.is_cuda else "cpu (dry run)",
                   l2_bytes=l2, method=method, b=B, s=S, date=gpu_common.utc_now()))
    ceiling(target, timer, out)
    overhead(target, out)
    for dtype_name in (args.dtypes or ("fp16" if args.dry_run else "fp16,bf16")).split(","):
        for label, xshape, ch, dry_xshape, dry_ch in SHAPES:
            shape, channels = (dry_xshape, dry_ch) if args.dry_run else (xshape, ch)
            bench_shape(label, shape, channels, dtype_name, target, timer, out, l2)
    out.write(dict(kind="done"))
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
