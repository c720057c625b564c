"""A small driver for compute-sanitizer: the launch paths of the cuda and triton backends, once each.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python tools/sanitize_driver.py --out s.jsonl
    compute-sanitizer --tool racecheck python tools/sanitize_driver.py --quick --backends cuda --tool-label racecheck
    python tools/sanitize_driver.py --dry-run        # CPU (Triton interpreter, CUDA emulator): the plumbing only

Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees an out-of-bounds access
as one instead of as a hit on a neighbouring pooled block. The shapes are small and cover the kernels'
plans: several tiny planes per block, odd sizes (scalar paths), 1x1, 5-D, channels_last (channel
vectors), strided views, one 64x64 plane per block, version 2, the radial mask, an empty band; for the
CUDA kernel also the two-sweep path (planes too large for shared memory, several row tiles). Triton gets
no large-threshold or large-plane case: each is a compile of its own, minutes for threshold 8.
Every case writes one JSON line (``tool``, ``backend``, ``case``, ``ok``, ``error``); the sanitizer's own
report goes to its output. Exit status 1 if any call raised or produced a non-finite value.
"""

from __future__ import annotations

import argparse
import sys
import traceback

import gpu_common  # tools/ is sys.path[0] when run as a script
from gpu_common import JsonLines, Target

import torch  # noqa: E402

ALL = ("cuda", "triton")
CUDA_ONLY = ("cuda",)
CASES = [
    # name, x shape, Ch, dtype, layout, options, backends
    ("tiny8x8", (2, 3, 8, 8), 5, torch.float16, "contiguous", {}, ALL),
    ("one_by_one", (2, 3, 1, 1), 2, torch.float32, "contiguous", {}, ALL),
    ("odd7x5_t2", (1, 3, 7, 5), 4, torch.float32, "contiguous", dict(threshold=2), ALL),
    ("five_d_v2", (1, 4, 3, 8, 8), 3, torch.bfloat16, "contiguous", dict(version=2), ALL),
    ("cl_vec", (2, 16, 8, 8), 8, torch.float16, "channels_last", {}, ALL),
    ("cl_scalar_radial", (2, 3, 5, 6), 5, torch.float32, "channels_last", dict(mask="radial", threshold=2), ALL),
    ("strided", (2, 3, 8, 8), 3, torch.float16, "strided", {}, ALL),
    ("plane64", (1, 4, 64, 64), 4, torch.bfloat16, "contiguous", {}, ALL),
    ("empty_band", (2, 3, 6, 6), 2, torch.float32, "contiguous", dict(threshold=0, high_gain=1.2), ALL),
    ("two_sweeps_t8", (1, 1, 130, 138), 1, torch.float32, "contiguous", dict(threshold=8), CUDA_ONLY),
    ("two_sweeps_vec", (1, 2, 200, 208), 2, torch.float16, "contiguous", {}, CUDA_ONLY),
]
# racecheck (shared-memory hazards) on the CUDA kernel: one case per shared-memory plan.
QUICK = {"tiny8x8", "cl_vec", "strided", "plane64", "two_sweeps_t8"}
# The dry run's interpreter and emulator run every case, but the large planes take long on a CPU.
DRY_RUN_SKIP = {"plane64", "two_sweeps_t8", "two_sweeps_vec"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpu_common.parse_args_common(parser)
    parser.add_argument("--backends", default="cuda,triton", help="comma list (default cuda,triton)")
    parser.add_argument("--quick", action="store_true", help="the racecheck subset of the shapes")
    parser.add_argument("--tool-label", default="none", help="the sanitizer tool this run is under (for the JSON)")
    args = parser.parse_args(argv)
    target = Target(args.dry_run)
    out = JsonLines(args.out)
    failures = 0
    torch.manual_seed(0)
    for backend in args.backends.split(","):
        why = target.why_unavailable(backend)
        if why is not None:
            out.write(dict(kind="case", tool=args.tool_label, backend=backend, case=None, ok=False,
                           error=f"backend unavailable: {why}"))
            failures += 1
            continue
        kernel = target.kernel(backend)
        for name, xshape, ch, dtype, layout, options, backends in CASES:
            if backend not in backends or (args.quick and name not in QUICK) or (args.dry_run and name in DRY_RUN_SKIP):
                continue
            record = dict(kind="case", tool=args.tool_label, backend=backend, case=name, dtype=gpu_common.SHORT[dtype])
            try:
                x, h = gpu_common.random_inputs(xshape, ch, dtype, target.device, layout)
                b = torch.tensor(1.3, device=target.device)
                s = torch.tensor(0.6, device=target.device)
                result = kernel(x, h, b, s, **options)
                target.synchronize()
                record["ok"] = bool(torch.isfinite(result).all())
                if not record["ok"]:
                    record["error"] = "non-finite output"
            except Exception as error:  # noqa: BLE001 - every case runs; the sanitizer report says where
                record.update(ok=False, error=f"{type(error).__name__}: {error}"[:500])
                traceback.print_exc()
            failures += not record["ok"]
            out.write(record)
    out.write(dict(kind="driver_summary", tool=args.tool_label, failures=failures))
    out.close()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
