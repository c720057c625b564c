"""The "triton" backend: the whole FreeU concat in ONE Triton launch.

Work decomposition. The output has N * (Cx + Ch) * F planes of H x W (F = 1 for 4-D). A program owns
BLOCK_P consecutive output planes and every element of them: backbone planes (channel c < Cx) are read
from x, scaled and written at channel c; skip planes are read from h, filtered and written at channel
Cx + c' -- the concat is only an offset. Each input element is read once and each output element written
once when a plane tile fits on chip (NUM_CHUNKS == 1); larger planes are swept twice in row chunks
(moments, then the update), the second read hitting L2.

Math (DESIGN.md section 2). For grid frequency (i, j), ky = ky0 + i, kx = kx0 + j, with the separable
twiddles a_i(y) = 2 pi (ky y mod H) / H and b_j(x) = 2 pi (kx x mod W) / W:

    R_ij = sum_{y,x} h cos(a_i + b_j) = sum_y [cos a_i Tc_j(y) - sin a_i Ts_j(y)]      Tc_j(y) = sum_x h cos b_j
    I_ij = sum_{y,x} h sin(a_i + b_j) = sum_y [sin a_i Tc_j(y) + cos a_i Ts_j(y)]      Ts_j(y) = sum_x h sin b_j
    X(k) = R - i I,  w_ij = (s - g_hi) [k in mask] / (H W)
    h'(y, x) = g_hi h + sum_j [Uc_j(y) cos b_j(x) + Us_j(y) sin b_j(x)]
    Uc_j = sum_i w_ij (R_ij cos a_i + I_ij sin a_i),   Us_j = sum_i w_ij (I_ij cos a_i - R_ij sin a_i)

so each element costs 2 multiply-adds per frequency column for the moments and 2 for the update.
The moments of all (i, j) are kept in two (BLOCK_P, NF) accumulators addressed by a one-hot mask
(Triton has no arrays of tensors). Twiddle arguments are reduced in integers and centred on 0, so cos and
sin see |angle| <= pi. Scalars are cast to float32 in the kernel; b and s are read from device memory
when they live there, so a schedule that changes them never recompiles and is never baked into a graph.
No libdevice, no inline asm: the kernel runs under TRITON_INTERPRET=1 on CPU tensors, which CI uses.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..spec import KERNEL_DTYPES, FreeUSpec, allocate_output

__all__ = ["fused_concat_triton", "launch_config"]

TWO_PI = 2.0 * math.pi

# Elements of one program's tile: enough work per program to hide latency, few enough to stay in
# registers (a 64x64 plane is one tile).
_TILE_ELEMENTS = 4096


@triton.jit
def _twiddle(k, pos, size):
    """cos and sin of 2 pi (k pos mod size) / size, argument reduced in integers to [-pi, pi]."""
    r = (k * pos) % size
    r = tl.where(2 * r > size, r - size, r)
    angle = r.to(tl.float32) * 6.283185307179586 / size
    return tl.cos(angle), tl.sin(angle)


@triton.jit
def _round_to_output(value, out_dtype: tl.constexpr):
    """float32 -> output dtype, rounding to nearest even.

    bfloat16 is rounded by hand in integers (the upper 16 bits of a float32, with round-half-even
    on the lower 16) because Triton's interpreter truncates that conversion; the GPU's own conversion
    gives the same bits. NaN is kept NaN.
    """
    if out_dtype == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        as_bf16 = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(value != value, value.to(tl.bfloat16), as_bf16)
    return value.to(out_dtype)


@triton.jit
def _load_tile(x_ptr, h_ptr, x_base, h_base, is_skip, plane_ok, rows, cols, H, W,
               sxh, sxw, shh, shw):
    """One (BLOCK_P, BLOCK_H, BLOCK_W) tile of input planes in float32, 0 outside the planes."""
    y = rows[None, :, None]
    x = cols[None, None, :]
    inside = plane_ok[:, None, None] & (y < H) & (x < W)
    skip = is_skip[:, None, None]
    from_x = tl.load(x_ptr + (x_base[:, None, None] + y * sxh + x * sxw), mask=inside & (skip == 0), other=0.0)
    from_h = tl.load(h_ptr + (h_base[:, None, None] + y * shh + x * shw), mask=inside & (skip != 0), other=0.0)
    return tl.where(skip != 0, from_h.to(tl.float32), from_x.to(tl.float32)), inside


@triton.jit
def _accumulate_moments(v, rows, cols, H, W, mom_r, mom_i, fidx,
                        KY0, KX0, NY: tl.constexpr, NX: tl.constexpr):
    """Add this tile's contribution to R_ij and I_ij (one-hot columns of the (BLOCK_P, NF) accumulators)."""
    for j in tl.static_range(NX):
        cb, sb = _twiddle(KX0 + j, cols, W)
        t_cos = tl.sum(v * cb[None, None, :], axis=2)  # Tc_j(y), (BLOCK_P, BLOCK_H)
        t_sin = tl.sum(v * sb[None, None, :], axis=2)  # Ts_j(y)
        for i in tl.static_range(NY):
            ca, sa = _twiddle(KY0 + i, rows, H)
            r = tl.sum(ca[None, :] * t_cos - sa[None, :] * t_sin, axis=1)
            im = tl.sum(sa[None, :] * t_cos + ca[None, :] * t_sin, axis=1)
            hot = fidx[None, :] == (i * NX + j)
            mom_r += tl.where(hot, r[:, None], 0.0)
            mom_i += tl.where(hot, im[:, None], 0.0)
    return mom_r, mom_i


@triton.jit
def _lowrank_update(rows, cols, H, W, mom_r, mom_i, fidx, gain_delta, KY0_SIGNED, KX0_SIGNED, RADIUS_SQ,
                    KY0, KX0, NY: tl.constexpr, NX: tl.constexpr, RADIAL: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """sum_j Uc_j(y) cos b_j(x) + Us_j(y) sin b_j(x) for the tile's rows and columns."""
    corr = tl.zeros((BLOCK_P, BLOCK_H, BLOCK_W), dtype=tl.float32)
    for j in tl.static_range(NX):
        u_cos = tl.zeros((BLOCK_P, BLOCK_H), dtype=tl.float32)
        u_sin = tl.zeros((BLOCK_P, BLOCK_H), dtype=tl.float32)
        for i in tl.static_range(NY):
            hot = fidx[None, :] == (i * NX + j)
            w = gain_delta
            if RADIAL:
                ky = KY0_SIGNED + i
                kx = KX0_SIGNED + j
                w = tl.where(ky * ky + kx * kx < RADIUS_SQ, gain_delta, 0.0)
            r = tl.sum(tl.where(hot, mom_r, 0.0), axis=1)[:, None] * w
            im = tl.sum(tl.where(hot, mom_i, 0.0), axis=1)[:, None] * w
            ca, sa = _twiddle(KY0 + i, rows, H)
            u_cos += r * ca[None, :] + im * sa[None, :]
            u_sin += im * ca[None, :] - r * sa[None, :]
        cb, sb = _twiddle(KX0 + j, cols, W)
        corr += u_cos[:, :, None] * cb[None, None, :] + u_sin[:, :, None] * sb[None, None, :]
    return corr


@triton.jit
def _fused_concat_kernel(
    x_ptr, h_ptr, out_ptr, map_ptr, b_ptr, s_ptr,
    b_val, s_val, high_gain,
    n_planes, CX, C_OUT, F, H, W, WIN_START, WIN_STOP,
    sxn, sxc, sxf, sxh, sxw,
    shn, shc, shf, shh, shw,
    son, soc, sof, soh, sow,
    KY0_SIGNED, KX0_SIGNED, KY0, KX0, RADIUS_SQ,
    NY: tl.constexpr, NX: tl.constexpr, NF: tl.constexpr, RADIAL: tl.constexpr,
    HAS_MAP: tl.constexpr, FACTORS_IN_MEMORY: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, NUM_CHUNKS: tl.constexpr,
):
    pid = tl.program_id(0)
    plane = pid.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    plane_ok = plane < n_planes
    plane = tl.where(plane_ok, plane, 0)
    f = plane % F
    c = (plane // F) % C_OUT
    n = plane // (F * C_OUT)
    is_skip = (c >= CX).to(tl.int32)
    # Clamp the channel of the other tensor so masked-off lanes still hold in-range addresses.
    cx_idx = tl.where(is_skip != 0, 0, c)
    ch_idx = tl.where(is_skip != 0, c - CX, 0)
    x_base = n * sxn + cx_idx * sxc + f * sxf
    h_base = n * shn + ch_idx * shc + f * shf
    o_base = n * son + c * soc + f * sof

    if FACTORS_IN_MEMORY:
        b = tl.load(b_ptr).to(tl.float32)
        s = tl.load(s_ptr).to(tl.float32)
    else:
        b = tl.cast(b_val, tl.float32)
        s = tl.cast(s_val, tl.float32)
    g_hi = tl.cast(high_gain, tl.float32)
    gain_delta = (s - g_hi) / (H * W)
    in_window = (is_skip == 0) & (c >= WIN_START) & (c < WIN_STOP)

    rows0 = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_W)
    fidx = tl.arange(0, NF)
    mom_r = tl.zeros((BLOCK_P, NF), dtype=tl.float32)
    mom_i = tl.zeros((BLOCK_P, NF), dtype=tl.float32)

    if NUM_CHUNKS == 1:
        # The plane tile fits on chip: read once, reduce, update, write.
        v, inside = _load_tile(x_ptr, h_ptr, x_base, h_base, is_skip, plane_ok, rows0, cols, H, W,
                               sxh, sxw, shh, shw)
        if NY * NX > 0:
            mom_r, mom_i = _accumulate_moments(v, rows0, cols, H, W, mom_r, mom_i, fidx, KY0, KX0, NY, NX)
        _finish_tile(v, inside, rows0, cols, out_ptr, map_ptr, o_base, n, f, F, H, W, soh, sow, is_skip,
                     in_window, b, g_hi, mom_r, mom_i, fidx, gain_delta, KY0_SIGNED, KX0_SIGNED, RADIUS_SQ,
                     KY0, KX0, NY, NX, RADIAL, HAS_MAP, BLOCK_P, BLOCK_H, BLOCK_W)
    else:
        # Large planes: sweep 1 takes the moments over row chunks, sweep 2 reads again (from L2) and writes.
        if NY * NX > 0:
            for chunk in range(NUM_CHUNKS):
                rows = rows0 + chunk * BLOCK_H
                v, _ = _load_tile(x_ptr, h_ptr, x_base, h_base, is_skip, plane_ok, rows, cols, H, W,
                                  sxh, sxw, shh, shw)
                mom_r, mom_i = _accumulate_moments(v, rows, cols, H, W, mom_r, mom_i, fidx, KY0, KX0, NY, NX)
        for chunk in range(NUM_CHUNKS):
            rows = rows0 + chunk * BLOCK_H
            v, inside = _load_tile(x_ptr, h_ptr, x_base, h_base, is_skip, plane_ok, rows, cols, H, W,
                                   sxh, sxw, shh, shw)
            _finish_tile(v, inside, rows, cols, out_ptr, map_ptr, o_base, n, f, F, H, W, soh, sow, is_skip,
                         in_window, b, g_hi, mom_r, mom_i, fidx, gain_delta, KY0_SIGNED, KX0_SIGNED, RADIUS_SQ,
                         KY0, KX0, NY, NX, RADIAL, HAS_MAP, BLOCK_P, BLOCK_H, BLOCK_W)


@triton.jit
def _finish_tile(v, inside, rows, cols, out_ptr, map_ptr, o_base, n, f, F, H, W, soh, sow, is_skip,
                 in_window, b, g_hi, mom_r, mom_i, fidx, gain_delta, KY0_SIGNED, KX0_SIGNED, RADIUS_SQ,
                 KY0, KX0, NY: tl.constexpr, NX: tl.constexpr, RADIAL: tl.constexpr, HAS_MAP: tl.constexpr,
                 BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Scale (backbone planes) or filter (skip planes) one tile and store it at its output channel."""
    y = rows[None, :, None]
    x = cols[None, None, :]
    if HAS_MAP:
        map_off = (n * F + f)[:, None, None] * (H * W) + y * W + x
        scale = tl.load(map_ptr + map_off, mask=inside & in_window[:, None, None], other=1.0)
    else:
        scale = tl.where(in_window, b, 1.0)[:, None, None]
    filtered = g_hi * v
    if NY * NX > 0:
        filtered += _lowrank_update(rows, cols, H, W, mom_r, mom_i, fidx, gain_delta,
                                    KY0_SIGNED, KX0_SIGNED, RADIUS_SQ, KY0, KX0, NY, NX, RADIAL,
                                    BLOCK_P, BLOCK_H, BLOCK_W)
    result = tl.where(is_skip[:, None, None] != 0, filtered, v * scale)
    o_off = o_base[:, None, None] + y * soh + x * sow
    tl.store(out_ptr + o_off, _round_to_output(result, out_ptr.dtype.element_ty), mask=inside)


def _logical_strides(t: torch.Tensor):
    """(n, c, f, h, w) element strides; f's stride is 0 for a 4-D tensor (F = 1)."""
    if t.dim() == 5:
        return tuple(t.stride())
    sn, sc, sh, sw = t.stride()
    return sn, sc, 0, sh, sw


def launch_config(spec: FreeUSpec, planes_contiguous: bool, min_programs: int = 512):
    """Tile shape for one call: (BLOCK_P, BLOCK_H, BLOCK_W, NUM_CHUNKS, num_warps).

    Planes that fit the tile are done in one sweep, several per program when small (8x8 SD1.5 planes)
    while leaving ``min_programs`` programs to fill the GPU (the interpreter, which pays per program,
    asks for 1). Larger planes are cut in row chunks. When planes are
    adjacent in memory (channels_last: the plane axis has stride 1) a program takes 16 planes so its
    loads are coalesced along channels.
    """
    block_w = triton.next_power_of_2(max(1, spec.width))
    block_h_full = triton.next_power_of_2(max(1, spec.height))
    n_planes = spec.batch * spec.out_channels * spec.frames
    min_planes = 16 if planes_contiguous else 1
    if block_h_full * block_w * min_planes <= _TILE_ELEMENTS:
        block_h, chunks = block_h_full, 1
        fit = _TILE_ELEMENTS // (block_h * block_w)
        block_p = max(min_planes, min(fit, triton.next_power_of_2(max(1, n_planes // min_programs))))
        block_p = min(block_p, fit)
    else:
        block_p = min_planes
        block_h = max(1, min(block_h_full, _TILE_ELEMENTS // (block_w * block_p)))
        chunks = triton.cdiv(spec.height, block_h)
    tile = block_p * block_h * block_w
    num_warps = 8 if tile >= 4096 else 4 if tile >= 512 else 1
    return block_p, block_h, block_w, chunks, num_warps


def fused_concat_triton(x, h, b, s, spec: FreeUSpec, scale_map=None) -> torch.Tensor:
    """FreeU at one concat in one Triton launch (see the module docstring for the kernel)."""
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; the triton backend takes {KERNEL_DTYPES}; use backend='torch'")
    out = allocate_output(x, spec.skip_channels)
    n_planes = spec.batch * spec.out_channels * spec.frames
    if out.numel() == 0:
        return out
    band = spec.band
    ny, nx = (0, 0) if band.empty else (band.ny, band.nx)
    factors_in_memory = b.device == x.device and s.device == x.device
    if factors_in_memory:
        b_val = s_val = 0.0
    else:
        b_val, s_val = float(b.item()), float(s.item())  # CPU scalars: read on the host, no device sync
    planes_contiguous = _logical_strides(x)[1] == 1 and _logical_strides(out)[1] == 1
    min_programs = 1 if x.device.type == "cpu" else 512  # CPU tensors only run under the interpreter
    block_p, block_h, block_w, chunks, num_warps = launch_config(spec, planes_contiguous, min_programs)
    scale_map = scale_map.to(device=x.device, dtype=torch.float32).contiguous() if scale_map is not None else None
    grid = (triton.cdiv(n_planes, block_p),)
    _fused_concat_kernel[grid](
        x, h, out, scale_map if scale_map is not None else x,
        b if factors_in_memory else x, s if factors_in_memory else x,
        b_val, s_val, spec.high_gain,
        n_planes, spec.backbone_channels_total, spec.out_channels, spec.frames, spec.height, spec.width,
        spec.window[0], spec.window[1],
        *_logical_strides(x), *_logical_strides(h), *_logical_strides(out),
        band.ky0, band.kx0, band.ky0 % max(1, spec.height), band.kx0 % max(1, spec.width),
        band.radius_sq or 0,
        NY=ny, NX=nx, NF=triton.next_power_of_2(max(1, ny * nx)), RADIAL=band.radial,
        HAS_MAP=scale_map is not None, FACTORS_IN_MEMORY=factors_in_memory,
        BLOCK_P=block_p, BLOCK_H=block_h, BLOCK_W=block_w, NUM_CHUNKS=chunks,
        num_warps=num_warps,
    )
    return out
