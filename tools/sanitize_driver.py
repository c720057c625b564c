"""A small driver for compute-sanitizer: every launch path of the cuda and triton backends, once each.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python tools/sanitize_driver.py
    compute-sanitizer --tool racecheck python tools/sanitize_driver.py --quick

Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees an out-of-bounds access
as one instead of as a hit on a neighbouring pooled block. The shapes cover the kernel's plans: several
tiny planes per block, odd sizes (scalar paths), 1x1, 5-D, channels_last (channel vectors), strided views,
one 64x64 plane per block, the two-sweep path (planes too large for shared memory, several row tiles),
version 2, the radial mask, an empty band. Exit status 1 if any call raised or produced a non-finite value.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
import traceback

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when run as tools/<script>.py
import freeu_kernels  # noqa: E402

CASES = [
    # name, x shape, Ch, dtype, layout, options
    ("tiny8x8", (2, 3, 8, 8), 5, torch.float16, "contiguous", {}),
    ("one_by_one", (2, 3, 1, 1), 2, torch.float32, "contiguous", {}),
    ("odd7x5", (1, 3, 7, 5), 4, torch.float32, "contiguous", dict(threshold=2)),
    ("five_d_v2", (1, 4, 3, 8, 8), 3, torch.bfloat16, "contiguous", dict(version=2)),
    ("cl_vec", (2, 16, 8, 8), 8, torch.float16, "channels_last", {}),
    ("cl_scalar", (2, 3, 5, 6), 5, torch.float32, "channels_last", dict(mask="radial", threshold=2)),
    ("strided", (2, 3, 8, 8), 3, torch.float16, "strided", {}),
    ("plane64", (1, 4, 64, 64), 4, torch.bfloat16, "contiguous", {}),
    ("two_sweeps", (1, 1, 130, 138), 1, torch.float32, "contiguous", dict(threshold=8)),
    ("two_sweeps_vec", (1, 2, 200, 208), 2, torch.float16, "contiguous", {}),
    ("empty_band", (2, 3, 6, 6), 2, torch.float32, "contiguous", dict(threshold=0, high_gain=1.2)),
]
QUICK = {"tiny8x8", "cl_vec", "strided", "plane64", "two_sweeps"}


def make_inputs(xshape, ch, dtype, layout):
    hshape = (xshape[0], ch) + tuple(xshape[2:])
    if layout == "strided":
        x = torch.randn(xshape[:-1] + (2 * xshape[-1],), device="cuda", dtype=dtype)[..., ::2]
        h = torch.randn(hshape[:-1] + (2 * hshape[-1],), device="cuda", dtype=dtype)[..., ::2]
        return x, h
    x = torch.randn(xshape, device="cuda", dtype=dtype)
    h = torch.randn(hshape, device="cuda", dtype=dtype)
    if layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x, h = x.contiguous(memory_format=fmt), h.contiguous(memory_format=fmt)
    return x, h


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="cuda,triton", help="comma list (default cuda,triton)")
    parser.add_argument("--quick", action="store_true", help="a subset of the shapes (for racecheck)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("sanitize_driver: no CUDA device", file=sys.stderr)
        return 1
    available = freeu_kernels.available_backends("cuda")
    failures = 0
    torch.manual_seed(0)
    for backend in args.backends.split(","):
        if backend not in available:
            print(f"[skip] backend {backend} is not available here")
            continue
        for name, xshape, ch, dtype, layout, options in CASES:
            if args.quick and name not in QUICK:
                continue
            try:
                x, h = make_inputs(xshape, ch, dtype, layout)
                b = torch.tensor(1.3, device="cuda")
                s = torch.tensor(0.6, device="cuda")
                out = freeu_kernels.fused_concat(x, h, b, s, backend=backend, **options)
                torch.cuda.synchronize()
                ok = bool(torch.isfinite(out).all())
                print(f"[{'ok' if ok else 'NONFINITE'}] {backend:6s} {name}")
                failures += not ok
            except Exception:
                failures += 1
                print(f"[ERROR] {backend:6s} {name}")
                traceback.print_exc()
    print(f"sanitize_driver: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
