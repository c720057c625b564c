"""The cases of the codegen report (issue 10), with shapes taken from bench/cases.py's U-Net decoder walk.

Every shape is looked up among the concats ``bench.cases.op_cases`` derives from the published U-Net configs
(batch 2: classifier-free guidance), so a case here is a concat some model really meets; the lookup fails
loudly if a config change removes one. Filter settings: threshold 1 box (FreeU's default), radial threshold 2,
version 2 (the backbone scale map) and threshold 8 (the largest the low-rank kernels take: 16 frequencies per
axis), each on the SDXL planes where the budgets apply.
"""

from __future__ import annotations

import fnmatch
from dataclasses import replace
from typing import List, Optional, Sequence, Tuple

import torch

from ..cases import op_cases
from .model import CodegenCase

__all__ = ["BATCH", "DTYPES", "SHAPES", "all_cases", "quick_cases", "select_cases", "shape_case"]

BATCH = 2
DTYPES = ("fp16", "bf16", "fp32")

# (case name, family of bench/cases.py, backbone channels, skip channels, plane side, channels_last)
SHAPES: Tuple[Tuple[str, str, int, int, int, bool], ...] = (
    ("sdxl-32x32-1280+1280", "sdxl-1024", 1280, 1280, 32, False),
    ("sdxl-32x32-1280+640", "sdxl-1024", 1280, 640, 32, False),
    ("sdxl-64x64-640+640", "sdxl-1024", 640, 640, 64, False),
    ("sd15-8x8-1280+1280", "sd15-512", 1280, 1280, 8, False),
    ("sd15-16x16-1280+640", "sd15-512", 1280, 640, 16, False),
    ("sdxl2048-128x128-640+640", "sdxl-2048", 640, 640, 128, False),
    ("video16f-8x8-1280+1280", "video-sd15-512-16f", 1280, 1280, 8, False),
    ("sdxl-64x64-640+640-cl", "sdxl-1024", 640, 640, 64, True),
    ("sd15-8x8-1280+1280-cl", "sd15-512", 1280, 1280, 8, True),
)

# Filter variants, each on these base shapes and dtypes: (suffix, base case names, dtypes, settings).
_VARIANTS = (
    ("-t2radial", ("sdxl-32x32-1280+1280", "sdxl-64x64-640+640"), ("fp16",), dict(threshold=2, mask="radial")),
    ("-v2", ("sdxl-32x32-1280+1280", "sdxl-64x64-640+640"), ("fp16",), dict(version=2)),
    ("-t8", ("sdxl-32x32-1280+1280", "sdxl-64x64-640+640"), ("fp16",), dict(threshold=8)),
)

_QUICK = ("sdxl-32x32-1280+1280", "sdxl-64x64-640+640")
_QUICK_DTYPES = ("fp16", "bf16")


def shape_case(name: str, dtype: str) -> CodegenCase:
    """The threshold-1 box case of one entry of SHAPES, its shapes looked up in bench/cases.py."""
    rows = [row for row in SHAPES if row[0] == name]
    if not rows:
        raise ValueError(f"name must be one of {[row[0] for row in SHAPES]}, got {name!r}")
    _, family, cx, ch, size, channels_last = rows[0]
    found = [c for c in op_cases([torch.float16], (BATCH,), (family,))
             if c.x_shape[1] == cx and c.h_shape[1] == ch and c.x_shape[-1] == size]
    if len(found) != 1:
        raise LookupError(f"{family} has no single {cx}+{ch} concat at {size}x{size} (found {len(found)}): "
                          "bench/unet_configs.py changed?")
    return CodegenCase(name, tuple(found[0].x_shape), tuple(found[0].h_shape), dtype,
                       channels_last=channels_last)


def all_cases() -> List[CodegenCase]:
    """Every shape in every dtype at threshold 1, then the filter variants."""
    cases = [shape_case(row[0], dtype) for row in SHAPES for dtype in DTYPES]
    for suffix, bases, dtypes, settings in _VARIANTS:
        cases += [replace(shape_case(base, dtype), name=base + suffix, **settings)
                  for base in bases for dtype in dtypes]
    return cases


def quick_cases() -> List[CodegenCase]:
    """--quick: SDXL 32x32 1280+1280 and 64x64 640+640, fp16 and bf16, threshold 1."""
    return [shape_case(name, dtype) for name in _QUICK for dtype in _QUICK_DTYPES]


def select_cases(cases: Sequence[CodegenCase], patterns: Optional[Sequence[str]]) -> List[CodegenCase]:
    """Cases whose name (or "name/dtype") matches one of the globs; all of them when patterns is empty."""
    if not patterns:
        return list(cases)
    return [case for case in cases
            if any(fnmatch.fnmatch(case.name, p) or fnmatch.fnmatch(f"{case.name}/{case.dtype}", p)
                   for p in patterns)]
