"""The "triton" backend: the whole FreeU concat in ONE Triton launch (kernel: triton_kernels.py).

Design: docs/design.md sections 2 and 7.

This module is the launcher. :func:`launch_plan` computes, from the call's metadata alone (spec, strides,
device type), everything the launch needs: the grid, num_warps, the kernel's runtime integers and its
constexprs. The real launch and bench/codegen's Triton target both use it, so the code counted there is
the code that runs. Plans and twiddle tables are cached per key, so a repeated call costs a dictionary
look-up and the launch.

Work decomposition: programs [0, skip_programs) each filter BLOCK_P skip planes (read from h, written at
channel Cx + c'); the remaining programs copy (BLOCK_C x BLOCK_Q) tiles of the backbone, scaled, to
channels [0, Cx). Each input element is read once and each output element written once, except on
planes too large for one program's registers, which are swept twice (the second read hits L2).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import triton

from ..spec import KERNEL_DTYPES, FreeUSpec, FrequencyBand, allocate_output
from .triton_kernels import (
    BACKBONE_CHANNELS_LAST,
    BACKBONE_PLANES,
    BACKBONE_STRIDED,
    ROLE_BOTH,
    freeu_concat_kernel,
)

__all__ = ["bind_triton", "fused_concat_triton", "launch_plan", "LaunchPlan", "twiddle_table", "logical_strides"]

# Skip elements one program holds in registers at most; larger planes are swept in row chunks.
_SKIP_TILE_ELEMENTS = 4096
# Elements per thread a program aims for: 32 floats of v plus 32 of the correction stay well inside the
# register file, and 32 fp16 elements are four 16-byte loads in flight per thread before any use.
_ELEMENTS_PER_THREAD = 32
# Backbone tile per program in vectors of 16 bytes per thread (several loads in flight per thread).
_BACKBONE_VECTORS_PER_THREAD = 4
# Bands up to this many frequencies per axis are unrolled (constexpr frequencies: the kx = 0 column and
# the ky = 0 row cost no twiddle); larger ones run as runtime loops (fast compile, no spills).
_STATIC_BAND_MAX = 4
# Skip paths (the kernel's SWEEP): the plane tile in registers; planes too large for that swept twice in row
# chunks, either with column sums kept per thread (channels_last, small bands) or with one-hot moments.
_IN_REGISTERS, _SWEEP_ONE_HOT, _SWEEP_COLUMN_SUMS = 0, 1, 2
# Under the interpreter every program costs Python time: fewer, larger programs.
_INTERPRETER_BACKBONE_TILE = 16384


def logical_strides(t) -> Tuple[int, int, int, int, int]:
    """(n, c, f, h, w) element strides; f's stride is 0 for a 4-D tensor (F = 1)."""
    strides = tuple(t.stride())
    if len(strides) == 5:
        return strides
    sn, sc, sh, sw = strides
    return sn, sc, 0, sh, sw


def _planes_flat(strides, frames: int, height: int, width: int) -> bool:
    """True when each (n, c) holds its F * H * W elements contiguously in (f, y, x) order."""
    _, _, sf, sh, sw = strides
    return ((width == 1 or sw == 1) and (height == 1 or sh == width)
            and (frames == 1 or sf == height * width))


def _rows_flat(strides, height: int, width: int) -> bool:
    """True when each plane is contiguous (row stride W, unit column stride)."""
    _, _, _, sh, sw = strides
    return (width == 1 or sw == 1) and (height == 1 or sh == width)


def _channels_last(strides, frames: int, height: int, width: int) -> bool:
    """True when channels are contiguous and all positions share one stride (channels_last(_3d))."""
    _, sc, sf, sh, sw = strides
    return sc == 1 and (height == 1 or sh == width * sw) and (frames == 1 or sf == height * width * sw)


@dataclass(frozen=True)
class LaunchPlan:
    """One call's launch: grid, num_warps, the kernel's runtime integers and its constexprs.

    ``scalars`` and ``constexprs`` are keyword arguments of ``freeu_concat_kernel``; the pointers and the
    three float scalars (b_val, s_val, high_gain) are added at launch. ``table_shape`` says which twiddle
    table the kernel reads (see :func:`twiddle_table`).
    """

    grid: Tuple[int]
    num_warps: int
    options: Dict[str, object]  # compile options of the launch (num_warps, fp fusion)
    skip_programs: int
    backbone_programs: int
    skip_planes_per_program: int
    skip_elements_per_program: int
    backbone_elements_per_program: int
    scalars: Dict[str, int]
    constexprs: Dict[str, object]
    table_shape: Tuple[int, int, int, int, bool]  # (block_w, hp, height, width, y axis first)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


@functools.lru_cache(maxsize=256)
def launch_plan(spec: FreeUSpec, x_strides, h_strides, out_strides, device_type: str,
                factors_in_memory: bool, has_map: bool) -> LaunchPlan:
    """The launch for one call, from metadata only (usable without tensors, e.g. by bench/codegen).

    Skip planes: a program owns BLOCK_P consecutive channels of one (n, f); with channels_last (channel
    stride 1) 8 of them, so accesses are vectors along channels. Planes whose tile fits
    ``_SKIP_TILE_ELEMENTS`` are done in registers, several per program when small so each thread holds about
    ``_ELEMENTS_PER_THREAD`` elements (one 32x32 plane per one-warp program, 16 8x8 planes); with
    channels_last the tile is transposed so the first reduction runs over the axis held in registers.
    Larger planes are swept in row chunks: channels_last with a small band keeps per-thread column sums,
    everything else one-hot moments. The backbone is tiled (channels x positions) with the contiguous axis
    last and 4 16-byte vectors per thread; num_warps is the skip tile's, shared by both roles.
    """
    height, width, frames = spec.height, spec.width, spec.frames
    interpreted = device_type == "cpu"
    band = spec.band
    ny, nx = (0, 0) if band.empty else (band.ny, band.nx)
    block_w = _pow2(width)
    block_h_full = _pow2(height)
    skip_channels_fast = h_strides[1] == 1 and out_strides[1] == 1 and spec.skip_channels > 1
    min_planes = min(8, _pow2(spec.skip_channels)) if skip_channels_fast else 1
    plane_tile = block_h_full * block_w
    element_bytes = torch.empty((), dtype=spec.dtype).element_size()
    num_warps = None
    sweep = _IN_REGISTERS
    if plane_tile * min_planes <= _SKIP_TILE_ELEMENTS:
        block_h, chunks = block_h_full, 1
        fit = _SKIP_TILE_ELEMENTS // plane_tile
        wanted = fit if interpreted else max(1, (32 * _ELEMENTS_PER_THREAD) // plane_tile)
        block_p = max(min_planes, min(fit, wanted, _pow2(spec.skip_channels)))
    elif skip_channels_fast and ny <= _STATIC_BAND_MAX:
        # channels_last: one channel vector per thread, x across the lanes (and warps), each chunk's rows in
        # registers; ~32 elements per thread per chunk.
        sweep = _SWEEP_COLUMN_SUMS
        block_p = min_planes
        lanes = max(1, (block_p * element_bytes) // 16) * block_w
        num_warps = max(1, min(8, lanes // 32))
        block_h = max(1, min(block_h_full, (32 * num_warps * _ELEMENTS_PER_THREAD) // (block_p * block_w)))
        chunks = triton.cdiv(height, block_h)
    else:
        sweep = _SWEEP_ONE_HOT
        block_p = min_planes
        block_h = max(1, min(block_h_full, _SKIP_TILE_ELEMENTS // (block_w * block_p)))
        chunks = triton.cdiv(height, block_h)
    skip_tile = block_p * block_h * block_w
    # With channels holding the lanes, the x axis takes more lanes than y: reduce over y first.
    transpose = skip_channels_fast and sweep == _IN_REGISTERS and block_h > 1
    if num_warps is None:
        num_warps = max(1, min(8, skip_tile // (32 * _ELEMENTS_PER_THREAD)))
    # A program's planes are consecutive channels of one (n, f).
    skip_programs = spec.batch * frames * triton.cdiv(spec.skip_channels, block_p)

    cx = spec.backbone_channels_total
    n_positions = frames * height * width
    backbone_tile = (_INTERPRETER_BACKBONE_TILE if interpreted
                     else num_warps * 32 * (16 // element_bytes) * _BACKBONE_VECTORS_PER_THREAD)
    if _planes_flat(x_strides, frames, height, width) and _planes_flat(out_strides, frames, height, width):
        mode = BACKBONE_PLANES
    elif (_channels_last(x_strides, frames, height, width) and _channels_last(out_strides, frames, height, width)
          and cx > 1):
        mode = BACKBONE_CHANNELS_LAST
    else:
        mode = BACKBONE_STRIDED
    if mode == BACKBONE_CHANNELS_LAST:
        block_c = min(_pow2(cx), 64)
        block_q = max(1, min(_pow2(n_positions), backbone_tile // block_c))
    else:
        block_q = min(_pow2(n_positions), backbone_tile)
        block_c = max(1, min(_pow2(cx), backbone_tile // block_q))
    c_blocks, q_blocks = triton.cdiv(cx, block_c), triton.cdiv(n_positions, block_q)
    backbone_programs = spec.batch * c_blocks * q_blocks if cx > 0 else 0

    scalars = dict(
        n_skip_programs=skip_programs, CX=cx, CH=spec.skip_channels, F=frames,
        n_chunks=chunks, ny=ny, nx=nx, n_positions=n_positions, c_blocks=c_blocks, q_blocks=q_blocks,
        WIN_START=spec.window[0], WIN_STOP=spec.window[1],
        **dict(zip(("sxn", "sxc", "sxf", "sxh", "sxw"), x_strides)),
        **dict(zip(("shn", "shc", "shf", "shh", "shw"), h_strides)),
        **dict(zip(("son", "soc", "sof", "soh", "sow"), out_strides)),
    )
    constexprs = dict(
        H=height, W=width, KY0=band.ky0, NY=ny, KX0=band.kx0, NX=nx,
        NF=(_pow2(ny) if sweep == _SWEEP_COLUMN_SUMS else _pow2(ny * nx)) if sweep else 1,
        RADIUS_SQ=band.radius_sq if band.radial else -1,
        STATIC_BAND=max(ny, nx) <= _STATIC_BAND_MAX,
        BLOCK_P=block_p, BLOCK_H=block_h, BLOCK_W=block_w, HP=block_h * chunks, SWEEP=sweep, TRANSPOSE=transpose,
        FLAT=_rows_flat(h_strides, height, width) and _rows_flat(out_strides, height, width),
        FULL_P=spec.skip_channels % block_p == 0, FULL_H=block_h * chunks == height, FULL_W=block_w == width,
        BACKBONE_MODE=mode, BLOCK_C=block_c, BLOCK_Q=block_q,
        BACKBONE_EVEN=cx % block_c == 0 and n_positions % block_q == 0,
        HAS_MAP=has_map, FACTORS_IN_MEMORY=factors_in_memory, MANUAL_BF16=interpreted, ROLE=ROLE_BOTH,
    )
    return LaunchPlan(
        grid=(skip_programs + backbone_programs,), num_warps=num_warps,
        # FMA contraction stated, not left to the default (Triton 3.10 turns it off by default).
        options=dict(num_warps=num_warps, enable_fp_fusion=True), skip_programs=skip_programs,
        backbone_programs=backbone_programs, skip_planes_per_program=block_p,
        skip_elements_per_program=block_p * height * width,
        backbone_elements_per_program=block_c * block_q,
        scalars=scalars, constexprs=constexprs,
        table_shape=(block_w, block_h * chunks, height, width, transpose),
    )


def twiddle_table(band: FrequencyBand, table_shape, device) -> torch.Tensor:
    """float32 [cos_x (nx, BW) | sin_x (nx, BW) | cos_y (ny, HP) | sin_y (ny, HP)], zero past W and H.

    With ``y_first`` (the last entry of ``table_shape``) the y-axis half comes first.

    Entry (j, x) is cos / sin of 2 pi r / W with r = (kx x) mod W the exact integer residue (kx = kx0 + j),
    evaluated in float64, so large frequencies and positions lose nothing before the float32 rounding.
    Built with torch ops on ``device`` (no host copy: safe under CUDA-graph capture).
    """
    block_w, hp, height, width, y_first = table_shape
    ny, nx = (0, 0) if band.empty else (band.ny, band.nx)

    def axis(k0: int, count: int, size: int, padded: int) -> torch.Tensor:
        k = torch.arange(k0, k0 + count, device=device, dtype=torch.int64)[:, None]
        pos = torch.arange(padded, device=device, dtype=torch.int64)[None, :]
        angle = torch.remainder(k * pos, size).to(torch.float64) * (2.0 * math.pi / size)
        live = (pos < size).to(torch.float64)
        return torch.cat([(torch.cos(angle) * live).flatten(), (torch.sin(angle) * live).flatten()])

    parts = [axis(band.kx0, nx, width, block_w), axis(band.ky0, ny, height, hp)]
    if y_first:  # the kernel reduces over y first (TRANSPOSE)
        parts.reverse()
    table = torch.cat(parts).to(torch.float32)
    return table if table.numel() else torch.zeros(1, dtype=torch.float32, device=device)


_TABLES: Dict[tuple, torch.Tensor] = {}


def _cached_table(band: FrequencyBand, table_shape, device: torch.device) -> torch.Tensor:
    """twiddle_table, cached per (device, shape, band); under CUDA-graph capture built and not cached
    (a captured kernel has not run yet, so a cached table would hold garbage for a later eager call)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return twiddle_table(band, table_shape, device)
    key = (device, table_shape, band)
    table = _TABLES.get(key)
    if table is None:
        table = twiddle_table(band, table_shape, device)
        if device.type == "cuda":
            # Built by kernels queued on the current stream; a later call on another stream must not read
            # it before they ran. One synchronisation per (device, shape, band), on the first call only.
            torch.cuda.current_stream(device).synchronize()
        _TABLES[key] = table
    return table


def bind_triton(spec: FreeUSpec, x, h):
    """The launch bound to x's and h's shapes, strides and device (registry.bind contract): a function
    ``run(x, h, b, s, scale_map) -> out`` whose call allocates the output and queues one launch.

    The launch plan (grid, constexprs, runtime integers) is computed here, once; the twiddle table is
    looked up per call (_cached_table: under CUDA-graph capture it is built, not cached).
    """
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; the triton backend takes {KERNEL_DTYPES}; use backend='torch'")
    # The output's strides from a meta twin of x (allocate_output is deterministic in the strides): nothing
    # is allocated on the device here.
    out = allocate_output(torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta"), spec.skip_channels)
    empty = out.numel() == 0
    strides = (logical_strides(x), logical_strides(h), logical_strides(out))
    device_type, band, high_gain = x.device.type, spec.band, spec.high_gain
    plans = {}  # (factors in memory, has map) -> launch plan: at most four per binding

    def run(x, h, b, s, scale_map=None):
        out = allocate_output(x, spec.skip_channels)
        if empty:
            return out
        factors_in_memory = b.device == x.device and s.device == x.device
        if factors_in_memory:
            b_val = s_val = 0.0
        else:
            b_val, s_val = float(b.item()), float(s.item())  # CPU scalars: read on the host, no device sync
        variant = (factors_in_memory, scale_map is not None)
        bound = plans.get(variant)
        if bound is None:
            plan = launch_plan(spec, *strides, device_type, *variant)
            # The keyword arguments merged once: a call then unpacks one dict instead of building it.
            bound = plans[variant] = (plan, freeu_concat_kernel[plan.grid],
                                      {**plan.scalars, **plan.constexprs, **plan.options})
        plan, kernel, keywords = bound
        if plan.grid[0] == 0:
            return out
        table = _cached_table(band, plan.table_shape, x.device)
        if scale_map is not None:
            scale_map = scale_map.to(device=x.device, dtype=torch.float32).contiguous()
        kernel(x, h, out, scale_map if scale_map is not None else x, table,
               b if factors_in_memory else x, s if factors_in_memory else x, b_val, s_val, high_gain, **keywords)
        return out

    return run


def fused_concat_triton(x, h, b, s, spec: FreeUSpec, scale_map=None) -> torch.Tensor:
    """FreeU at one concat in one Triton launch (see triton_kernels.py for the kernel)."""
    return bind_triton(spec, x, h)(x, h, b, s, scale_map)
