"""Micro-benchmark: the fused op (cuda, triton, torch backends) against torch.cat and a plain copy.

The fused op must move at least what the concat moves: read x and h once, write the output once, i.e.
2 (|x| + |h|) bytes (version 1). The "copy" row copies a buffer of |x| + |h| elements into another of
the same size: the same bytes read and written, in one kernel, the practical ceiling. Every row prints
its median time, its bandwidth over those 2 (|x| + |h|) bytes, and that bandwidth as a % of the copy's.

Timing: CUDA events around each call, median of many, with L2 flushed before every call by writing a
buffer larger than the L2 (so the shapes that fit in L2 are not timed from it). Two modes: "eager"
(the call as Python issues it; the flush hides the host-side overhead) and "graph" (one call captured
in a CUDA graph and replayed, which removes launch gaps; used for every shape here since the small ones
are launch-bound). Results go to stdout and, as JSON, to --out.

    python tools/bench_cuda_vs_copy.py --out bench_cuda_vs_copy.json
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when run as tools/<script>.py
import freeu_kernels  # noqa: E402

SHAPES = [  # (label, x shape, h shape)
    ("sd15_8x8", (2, 1280, 8, 8), (2, 1280, 8, 8)),
    ("sd15_32x32", (2, 640, 32, 32), (2, 640, 32, 32)),
    ("sdxl_32x32", (2, 1280, 32, 32), (2, 1280, 32, 32)),
    ("sdxl_64x64", (2, 640, 64, 64), (2, 640, 64, 64)),
    ("sdxl_32x32_cx_ne_ch", (2, 1280, 32, 32), (2, 640, 32, 32)),
]


def _flush_buffer():
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return torch.empty(max(2 * l2, 64 << 20) // 4, dtype=torch.int32, device="cuda")


def time_call(fn, flush, reps: int, warmup: int = 10) -> float:
    """Median microseconds of fn() with L2 flushed before each call (CUDA events)."""
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3


def as_graph(fn):
    """fn captured once in a CUDA graph; returns the replay function (warm-up on a side stream first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON output file")
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda_vs_copy: no CUDA device", file=sys.stderr)
        return 1
    dtype = getattr(torch, args.dtype)
    backends = [b for b in ("cuda", "triton", "torch") if b in freeu_kernels.available_backends("cuda")]
    flush = _flush_buffer()
    props = torch.cuda.get_device_properties(0)
    meta = {
        "device": props.name, "sms": props.multi_processor_count, "l2_bytes": props.L2_cache_size,
        "torch": torch.__version__, "cuda": torch.version.cuda, "dtype": args.dtype, "reps": args.reps,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "bytes_counted": "2 * (|x| + |h|): x and h read once, the output written once",
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    # The ceiling on a large buffer, for context.
    big = torch.empty(1 << 28, dtype=torch.float16, device="cuda")
    big_out = torch.empty_like(big)
    big_us = time_call(functools.partial(big_out.copy_, big), flush, 20)
    meta["large_copy_gbps"] = 2 * big.numel() * big.element_size() / big_us / 1e3
    del big, big_out  # 1 GiB back to the allocator before the shapes
    print(f"{props.name}: large copy {meta['large_copy_gbps']:.0f} GB/s; backends {backends}; {args.dtype}")

    rows = []
    b = torch.tensor(1.3, device="cuda")
    s = torch.tensor(0.6, device="cuda")
    header = f"{'shape':22s} {'provider':8s} {'eager us':>9s} {'graph us':>9s} {'GB/s':>7s} {'% copy':>7s}"
    print(header)
    for label, xshape, hshape in SHAPES:
        x = torch.randn(xshape, device="cuda", dtype=dtype)
        h = torch.randn(hshape, device="cuda", dtype=dtype)
        nbytes = 2 * (x.numel() + h.numel()) * x.element_size()
        src = torch.empty(x.numel() + h.numel(), device="cuda", dtype=dtype)
        dst = torch.empty_like(src)
        providers = {"copy": lambda: dst.copy_(src), "cat": lambda: torch.cat([x, h], dim=1)}
        for name in backends:
            providers[name] = (lambda n: lambda: freeu_kernels.fused_concat(x, h, b, s, backend=n))(name)
        # Correctness guard: the timed kernels must agree with the torch backend.
        if "cuda" in backends:
            ref = freeu_kernels.fused_concat(x.float(), h.float(), b, s, backend="torch")
            err = (providers["cuda"]().float() - ref).abs().max().item()
            print(f"{label}: cuda vs torch(float32) max |diff| = {err:.3e}")
        copy_graph_us = None
        for name, fn in providers.items():
            eager = time_call(fn, flush, args.reps)
            graph = time_call(as_graph(fn), flush, args.reps)
            if name == "copy":
                copy_graph_us = graph
            gbps = nbytes / graph / 1e3
            pct = 100.0 * copy_graph_us / graph if copy_graph_us else float("nan")
            rows.append(dict(shape=label, x=list(xshape), h=list(hshape), provider=name, eager_us=eager,
                             graph_us=graph, bytes=nbytes, gbps=gbps, pct_of_copy=pct))
            print(f"{label:22s} {name:8s} {eager:9.2f} {graph:9.2f} {gbps:7.0f} {pct:6.1f}%")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
