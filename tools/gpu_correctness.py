"""Stage 2 of tools/gpu_verify.sh: the cuda and triton backends against the float64 oracle on a GPU (~90 s).

    python tools/gpu_correctness.py --out correctness.jsonl [--budget-s 90] [--dry-run]

One JSON line per (case, backend) as soon as it is checked: ``kind: "oracle"`` with the case, dtype,
shapes, layout, options, ``max_abs_err``, ``worst_ratio`` (max |err| / bound, <= 1 passes), the
tolerance and ``ok``; then ``kind: "graph"`` lines (one call captured in a CUDA graph, replayed with
b and s changed in place between replays, each replay against the oracle), ``kind: "stream"`` (a call
on a non-default stream), and a closing ``kind: "summary"``. Exit status 1 if any check failed.

The cases: SDXL 64x64 and 32x32 planes, Cx != Ch, SD 1.5 8x8, each in fp16/bf16/fp32; then threshold 2
radial, version 2, high_gain, a channel window; channels_last, 5-D, odd sizes, strided views; b and s
as device tensors (the graph-safe path) and as Python floats (read on the host). Each case is a Triton
specialisation of its own, so the list is kept to a few dozen. While the "cuda" checks run, the Triton
kernels of every case (and of tools/sanitize_driver.py's cases, which stage 4 runs) are compiled in
parallel worker processes into Triton's on-disk cache (``kind: "warmup"`` line), so the "triton" checks
that follow, the timing stage and the sanitizer find them there.
In a dry run (CPU; see tools/gpu_common.py) the same cases run on tiny shapes.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from typing import Dict, List, NamedTuple, Optional, Tuple

import gpu_common  # tools/ is sys.path[0] when run as a script
from gpu_common import DTYPES, SHORT, JsonLines, Target

import torch  # noqa: E402


class Case(NamedTuple):
    """One oracle check: shapes on the GPU and in the dry run, dtype, layout, op options, factor kind."""

    name: str
    xshape: Tuple[int, ...]
    ch: int
    dtype: str
    layout: str = "contiguous"
    options: Dict = {}
    dry_xshape: Tuple[int, ...] = (1, 4, 8, 8)
    dry_ch: int = 4
    factors: str = "device"  # "device": 0-d tensors on the GPU (graph-safe); "host": Python floats
    dry_options: Optional[Dict] = None  # options for the dry run's shapes, where they differ

    def shape(self, dry_run: bool) -> Tuple[Tuple[int, ...], int]:
        """(x shape, Ch) for this run."""
        return (self.dry_xshape, self.dry_ch) if dry_run else (self.xshape, self.ch)

    def opts(self, dry_run: bool) -> Dict:
        """The op options for this run."""
        return self.dry_options if dry_run and self.dry_options is not None else self.options


BASE_SHAPES = [  # name, x shape, Ch, dry x shape, dry Ch
    ("sdxl_64x64", (2, 640, 64, 64), 640, (1, 2, 16, 16), 2),
    ("sdxl_32x32", (2, 1280, 32, 32), 1280, (1, 4, 12, 12), 4),
    ("sdxl_32x32_cx_ne_ch", (2, 1280, 32, 32), 640, (1, 4, 8, 8), 2),
    ("sd15_8x8", (2, 1280, 8, 8), 1280, (1, 4, 8, 8), 4),
]
CX_NE_CH = dict(xshape=(2, 1280, 32, 32), ch=640, dry_xshape=(1, 4, 8, 8), dry_ch=2)
CASES: List[Case] = [
    Case(f"{name}_{dtype}", xs, ch, dtype, dry_xshape=dxs, dry_ch=dch)
    for dtype in ("fp16", "bf16", "fp32") for name, xs, ch, dxs, dch in BASE_SHAPES
] + [
    Case("t2_radial_fp16", dtype="fp16", options=dict(threshold=2, mask="radial"), **CX_NE_CH),
    Case("version2_bf16", dtype="bf16", options=dict(version=2), **CX_NE_CH),
    Case("high_gain_t2_fp32", dtype="fp32", options=dict(threshold=2, high_gain=1.3), **CX_NE_CH),
    Case("window_fp16", dtype="fp16", options=dict(backbone_channels=(320, 960)),
         dry_options=dict(backbone_channels=(1, 3)), **CX_NE_CH),
    Case("channels_last_fp16", dtype="fp16", layout="channels_last", **CX_NE_CH),
    Case("channels_last_sd15_bf16", (2, 1280, 8, 8), 1280, "bf16", "channels_last", dry_xshape=(1, 16, 4, 4),
         dry_ch=16),
    Case("five_d_fp16", (1, 320, 4, 32, 32), 320, "fp16", dry_xshape=(1, 2, 2, 8, 8), dry_ch=2),
    Case("odd_33x17_t2_fp32", (2, 3, 33, 17), 5, "fp32", options=dict(threshold=2), dry_xshape=(1, 3, 7, 5), dry_ch=5),
    Case("odd_63x65_bf16", (1, 7, 63, 65), 9, "bf16", dry_xshape=(1, 3, 9, 11), dry_ch=2),
    Case("strided_fp16", (2, 640, 32, 32), 320, "fp16", "strided", dry_xshape=(1, 3, 8, 8), dry_ch=2),
    Case("host_factors_sdxl_32x32_fp16", (2, 1280, 32, 32), 1280, "fp16", dry_xshape=(1, 4, 12, 12), factors="host"),
    Case("host_factors_v2_fp32", (2, 640, 64, 64), 640, "fp32", options=dict(version=2), dry_xshape=(1, 2, 16, 16),
         dry_ch=2, factors="host"),
]
# Graph replay with b and s changed in place: the plain case and version 2 (whose scale map the op
# computes from b inside the captured region).
GRAPH_CASES = ["sdxl_32x32_fp16", "version2_bf16"]
STREAM_CASE = "sdxl_64x64_fp16"
GRAPH_FACTORS = [(1.2, 0.6), (1.5, 0.2), (0.9, 1.0)]


def factors_for(index: int) -> Tuple[float, float]:
    """b, s for case ``index``: different per case, so a kernel that ignores one of them fails somewhere."""
    return 1.1 + 0.1 * (index % 5), 0.2 + 0.15 * (index % 6)


def as_factor(value: float, case: Case, device) -> object:
    """b or s as the case passes it: a 0-d float32 tensor on the device, or a Python float."""
    return torch.tensor(value, dtype=torch.float32, device=device) if case.factors == "device" else value


def case_inputs(case: Case, index: int, target: Target):
    """x, h of case ``index`` on the target's device."""
    xshape, ch = case.shape(target.dry_run)
    return gpu_common.random_inputs(xshape, ch, DTYPES[case.dtype], target.device, case.layout, seed=1000 + index)


def expected_format(x: torch.Tensor) -> torch.memory_format:
    """The output's memory format the op promises: x's (channels_last stays channels_last)."""
    from freeu_kernels.spec import output_memory_format

    return output_memory_format(x)


# ---------------------------------------------------------------------------------------------------------
# Parallel Triton warm-up (GPU only; each worker is a fresh process with its own CUDA context)
# ---------------------------------------------------------------------------------------------------------


def warm_items(dry_run: bool) -> List[Tuple]:
    """(label, x shape, Ch, dtype name, layout, options, factor kind) of every Triton call stages 2-4 make."""
    items = []
    for case in CASES:
        xshape, ch = case.shape(dry_run)
        items.append((case.name, xshape, ch, case.dtype, case.layout, case.opts(dry_run), case.factors))
    import sanitize_driver

    for name, xshape, ch, dtype, layout, options, backends in sanitize_driver.CASES:
        if "triton" in backends:
            items.append((f"sanitize:{name}", xshape, ch, SHORT[dtype], layout, options, "device"))
    return items


_WORKER_TARGET: Dict[str, Target] = {}


def _warm_one(item: Tuple, dry_run: bool) -> Dict:
    """In a worker process: run one item once on the triton backend (compiling it into the on-disk cache)."""
    if "target" not in _WORKER_TARGET:
        _WORKER_TARGET["target"] = Target(dry_run)
    target = _WORKER_TARGET["target"]
    label, xshape, ch, dtype, layout, options, factors = item
    started = time.perf_counter()
    try:
        x, h = gpu_common.random_inputs(xshape, ch, DTYPES[dtype], target.device, layout)
        b = torch.tensor(1.2, device=target.device) if factors == "device" else 1.2
        s = torch.tensor(0.5, device=target.device) if factors == "device" else 0.5
        target.kernel("triton")(x, h, b, s, **options)
        target.synchronize()
        return dict(item=label, seconds=round(time.perf_counter() - started, 2))
    except Exception as error:  # noqa: BLE001 - reported; the check itself will fail with the details
        return dict(item=label, error=f"{type(error).__name__}: {error}"[:300])


class TritonWarmup:
    """Compiles the Triton kernels of ``items`` in worker processes while the main process checks "cuda".

    Items are handed out one at a time (compile times differ a lot). ``finish`` waits until a deadline;
    workers still busy then are terminated (Triton writes its cache entries atomically) and the checks
    compile what is left.
    """

    def __init__(self, items: List[Tuple], workers: int, dry_run: bool):
        self.items, self.workers = items, workers
        self.started = time.perf_counter()
        self.pool = multiprocessing.get_context("spawn").Pool(processes=workers)
        self.pending = [self.pool.apply_async(_warm_one, (item, dry_run)) for item in items]

    def finish(self, timeout_s: float, out: JsonLines) -> None:
        """Waits at most until ``timeout_s`` after the start, stops the workers, writes the warm-up line."""
        results, note = [], "ok"
        try:
            for result in self.pending:
                left = timeout_s - (time.perf_counter() - self.started)
                results.append(result.get(timeout=max(left, 0.01)))
        except multiprocessing.TimeoutError:
            note = f"stopped after {timeout_s:.0f} s: the checks compile what is left"
        except Exception as error:  # noqa: BLE001 - a broken pool only costs the warm-up, not the checks
            note = f"warm-up failed: {type(error).__name__}: {error}"[:300]
        finally:
            self.pool.terminate()
            self.pool.join()
        compile_s = [r["seconds"] for r in results if "seconds" in r]
        out.write(dict(kind="warmup", backend="triton", workers=self.workers, items=len(self.items),
                       done=len(results), errors=[r for r in results if "error" in r],
                       max_item_s=max(compile_s, default=None), sum_item_s=round(sum(compile_s), 1),
                       seconds=round(time.perf_counter() - self.started, 1), note=note))


# ---------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------


def check_case(case: Case, index: int, target: Target, backends: List[str], tolerances, out: JsonLines) -> int:
    """Both backends on one case against the oracle; returns the number of failed checks."""
    x, h = case_inputs(case, index, target)
    b, s = factors_for(index)
    options = case.opts(target.dry_run)
    try:
        ref, ref_error = gpu_common.oracle(x, h, b, s, **options), None
    except Exception as error:  # noqa: BLE001 - bad case options: every backend's line says so
        ref, ref_error = None, f"oracle: {type(error).__name__}: {error}"[:500]
    input_scale = max(x.abs().max().item() if x.numel() else 0.0, h.abs().max().item() if h.numel() else 0.0)
    failures = 0
    for backend in backends:
        record = dict(kind="oracle", case=case.name, backend=backend, dtype=case.dtype, layout=case.layout,
                      options=options, factors=case.factors, b=b, s=s, **gpu_common.shapes_of(x, h))
        started = time.perf_counter()
        try:
            if ref_error:
                raise RuntimeError(ref_error)
            gpu_common.poison_next_output(ref.shape, x.dtype, x.device)
            result = target.kernel(backend)(x, h, as_factor(b, case, x.device), as_factor(s, case, x.device),
                                            **options)
            target.synchronize()
            record["seconds"] = round(time.perf_counter() - started, 3)
            record.update(gpu_common.compare_with_oracle(result, ref, x.dtype, input_scale, tolerances))
            layout_ok = result.dtype == x.dtype and result.is_contiguous(memory_format=expected_format(x))
            record["layout_ok"] = layout_ok
            record["ok"] = record["ok"] and layout_ok
        except Exception as error:  # noqa: BLE001 - one broken case must not hide the others
            record.update(ok=False, error=f"{type(error).__name__}: {error}"[:500], seconds=round(time.perf_counter() - started, 3))
        failures += not record["ok"]
        out.write(record)
    return failures


def check_graph_replay(case: Case, index: int, target: Target, backend: str, tolerances, out: JsonLines) -> int:
    """One call captured in a CUDA graph; b and s changed in place before each replay; each replay checked."""
    x, h = case_inputs(case, index, target)
    b = torch.tensor(GRAPH_FACTORS[0][0], dtype=torch.float32, device=target.device)
    s = torch.tensor(GRAPH_FACTORS[0][1], dtype=torch.float32, device=target.device)
    kernel = target.kernel(backend)
    record = dict(kind="graph", case=case.name, backend=backend, dtype=case.dtype, **gpu_common.shapes_of(x, h))
    try:
        if target.is_cuda:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture (module loading, JIT, caches)
                kernel(x, h, b, s, **case.opts(target.dry_run))
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                result = kernel(x, h, b, s, **case.opts(target.dry_run))
            replay, record["mode"] = graph.replay, "cuda graph"
        else:  # dry run: no graphs on CPU; the same loop calls the kernel directly
            result = None
            replay, record["mode"] = None, "direct calls (dry run: no CUDA graphs)"
        replays = []
        for bv, sv in GRAPH_FACTORS:
            b.fill_(bv)
            s.fill_(sv)
            if replay is not None:
                replay()
            else:
                result = kernel(x, h, b, s, **case.opts(target.dry_run))
            target.synchronize()
            ref = gpu_common.oracle(x, h, bv, sv, **case.opts(target.dry_run))
            check = gpu_common.compare_with_oracle(result, ref, x.dtype, 0.0, tolerances)
            replays.append(dict(b=bv, s=sv, ok=check["ok"], max_abs_err=check["max_abs_err"],
                                worst_ratio=check["worst_ratio"]))
        record.update(replays=replays, ok=all(r["ok"] for r in replays))
    except Exception as error:  # noqa: BLE001
        record.update(ok=False, error=f"{type(error).__name__}: {error}"[:500])
    out.write(record)
    return not record["ok"]


def check_side_stream(case: Case, index: int, target: Target, backend: str, tolerances, out: JsonLines) -> int:
    """A call issued on a non-default stream (inputs made on the default stream) against the oracle."""
    x, h = case_inputs(case, index, target)
    b, s = factors_for(index)
    record = dict(kind="stream", case=case.name, backend=backend, dtype=case.dtype, **gpu_common.shapes_of(x, h))
    try:
        bt, st = as_factor(b, case, x.device), as_factor(s, case, x.device)
        if target.is_cuda:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                result = target.kernel(backend)(x, h, bt, st, **case.opts(target.dry_run))
            side.synchronize()
            record["mode"] = "side stream"
        else:
            result = target.kernel(backend)(x, h, bt, st, **case.opts(target.dry_run))
            record["mode"] = "direct call (dry run: no streams on CPU)"
        record.update(gpu_common.compare_with_oracle(result, gpu_common.oracle(x, h, b, s, **case.opts(target.dry_run)),
                                                     x.dtype, 0.0, tolerances))
    except Exception as error:  # noqa: BLE001
        record.update(ok=False, error=f"{type(error).__name__}: {error}"[:500])
    out.write(record)
    return not record["ok"]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpu_common.parse_args_common(parser)
    parser.add_argument("--budget-s", type=float, default=90.0, help="time budget; the warm-up waits at most 60%% of it")
    parser.add_argument("--warm-workers", type=int, default=None,
                        help="Triton warm-up processes (default: min(12, cores - 2) on a GPU, 1 in a dry run)")
    parser.add_argument("--cases", help="comma list of case names (default: all)")
    args = parser.parse_args(argv)
    target = Target(args.dry_run)
    out = JsonLines(args.out)
    started = time.perf_counter()
    torch.manual_seed(0)
    tolerances = gpu_common.tolerance_table()
    backends = []
    for backend in gpu_common.FUSED_BACKENDS:
        why = target.why_unavailable(backend)
        if why is None:
            backends.append(backend)
        else:
            out.write(dict(kind="unavailable", backend=backend, reason=why, ok=False))
    cases = CASES if not args.cases else [c for c in CASES if c.name in args.cases.split(",")]
    warmup = None
    if "triton" in backends:
        items = warm_items(args.dry_run)
        if args.dry_run:  # the interpreter compiles nothing: two items exercise the pool's plumbing
            items = items[:2]
        workers = args.warm_workers if args.warm_workers is not None else (
            1 if args.dry_run else max(1, min(12, (os.cpu_count() or 4) - 4)))
        warmup = TritonWarmup(items, workers, args.dry_run)
    failures = 0
    # "cuda" (compiled ahead of time) first, while the workers compile the Triton kernels; then "triton".
    for backend in backends:
        if backend == "triton" and warmup is not None:
            warmup.finish(0.6 * args.budget_s, out)
        for index, case in enumerate(cases):
            failures += check_case(case, index, target, [backend], tolerances, out)
    by_name = {case.name: (index, case) for index, case in enumerate(CASES)}
    for backend in backends:
        for name in GRAPH_CASES:
            failures += check_graph_replay(by_name[name][1], by_name[name][0], target, backend, tolerances, out)
        failures += check_side_stream(by_name[STREAM_CASE][1], by_name[STREAM_CASE][0], target, backend,
                                      tolerances, out)
    checks = len(cases) * len(backends) + len(backends) * (len(GRAPH_CASES) + 1)
    out.write(dict(kind="summary", backends=backends, checks=checks, failed=failures,
                   missing_backends=[b for b in gpu_common.FUSED_BACKENDS if b not in backends],
                   seconds=round(time.perf_counter() - started, 1), ok=failures == 0 and len(backends) == 2))
    out.close()
    return 0 if failures == 0 and len(backends) == len(gpu_common.FUSED_BACKENDS) else 1


if __name__ == "__main__":
    sys.exit(main())
