"""The Triton kernel of the "triton" backend: FreeU's scaled backbone, filtered skip and concat in ONE launch.

One grid, two roles chosen by program id (the constexpr ``ROLE`` lets bench/codegen compile each role's
path alone for counting; the launcher always passes ``ROLE_BOTH``):

* programs ``[0, n_skip_programs)`` filter skip planes: a program owns the planes of BLOCK_P consecutive
  channels c' of one (n, f) of h (every element of them) and writes them at output channels Cx + c';
* the rest copy the backbone: ``out[n, c] = x[n, c] * scale`` over tiles of (channels x positions), with
  ``scale = b`` on the window's channels and 1 elsewhere (version 2: the float32 map), 16-byte vectors,
  several per thread in flight. No filter work is spent on backbone elements.

Skip filter math (docs/design.md section 2). For the band's frequency (i, j), ky = KY0 + i, kx = KX0 + j, with
separable twiddles ca_i(y) = cos 2 pi (ky y mod H) / H, sa_i(y) = sin ..., cb_j(x), sb_j(x) likewise on W,
read from a float32 table the launcher builds once per (device, H, W, band):

    tc_j(y) = sum_x v cb_j          ts_j(y) = sum_x v sb_j                      (row sums)
    R_ij = sum_y ca_i tc_j - sa_i ts_j       I_ij = sum_y sa_i tc_j + ca_i ts_j   (X(k) = R - i I)
    uc_j(y) = sum_i w_ij (R_ij ca_i + I_ij sa_i)    us_j(y) = sum_i w_ij (I_ij ca_i - R_ij sa_i)
    h'(y, x) = g_hi v + sum_j uc_j(y) cb_j(x) + us_j(y) sb_j(x)        w_ij = (s - g_hi) [k in mask] / (H W)

so an element costs 2 multiply-adds per frequency column for the row sums and 2 for the update (1 and 1
for the kx = 0 column, whose twiddles are cos 1, sin 0: with a small band the frequencies are constexpr
and such columns and rows cost no twiddle at all). Bands of up to 4 frequencies per axis are unrolled
(static_range, STATIC_BAND); larger ones run as runtime loops, so a threshold of 8 compiles in seconds and
does not spill.
Planes that fit a program's registers are read once and written once (SWEEP 0; with channels_last the
tile is transposed so the first reduction runs over y, the axis a thread holds). Larger planes are swept
twice in row chunks (moments, then the update; the second read hits L2): with channels_last and a small
band each thread keeps column sums cc_i(x) = sum_y v ca_i(y), cs_i(x) for its channels and columns
(SWEEP 2, no cross-lane work per chunk); otherwise the moments go to (BLOCK_P, NF) one-hot accumulators
(SWEEP 1).

Scalars are cast to float32 in the kernel; b and s are read from device memory when they live there,
so a schedule that changes them never recompiles and is never baked into a CUDA graph. Accumulation is
float32. No libdevice, no inline asm: the kernel runs under TRITON_INTERPRET=1 on CPU tensors (CI).
"""

from __future__ import annotations

import triton
import triton.language as tl

ROLE_BOTH, ROLE_SKIP, ROLE_BACKBONE = 0, 1, 2
# How the backbone role addresses x and out: planes contiguous (positions flat, stride 1), channels
# contiguous (channels_last: channel stride 1, one stride for all positions), or any strides.
BACKBONE_PLANES, BACKBONE_CHANNELS_LAST, BACKBONE_STRIDED = 0, 1, 2


@triton.jit
def _to_output(value, out_dtype: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """float32 -> output dtype, rounding to nearest even (NaN stays NaN).

    The GPU's bfloat16 conversion rounds to nearest even like torch; Triton's interpreter truncates, so
    there (MANUAL_BF16) the rounding is done by hand on the bits: the upper 16 bits of the float32 plus
    round-half-even on the lower 16.
    """
    if out_dtype == tl.bfloat16 and MANUAL_BF16:
        bits = value.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        as_bf16 = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(value != value, value.to(tl.bfloat16), as_bf16)
    return value.to(out_dtype)


@triton.jit
def _backbone_tile(x_ptr, out_ptr, map_ptr, b, pid_b, CX, n_positions, c_blocks, q_blocks,
                   WIN_START, WIN_STOP, sxn, sxc, sxf, sxh, sxw, son, soc, sof, soh, sow,
                   H: tl.constexpr, W: tl.constexpr, MODE: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_Q: tl.constexpr, EVEN: tl.constexpr, HAS_MAP: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """out[n, c, q] = x[n, c, q] * scale(c, q) for one (BLOCK_C channels x BLOCK_Q positions) tile.

    Positions q run over the F * H * W elements of one (n, c). The tile is laid out with the contiguous
    axis last (positions for MODE PLANES/STRIDED, channels for CHANNELS_LAST) so loads are 16-byte vectors.
    """
    q_block = pid_b % q_blocks
    rest = pid_b // q_blocks
    n = (rest // c_blocks).to(tl.int64)
    c0 = (rest % c_blocks) * BLOCK_C
    q0 = q_block * BLOCK_Q
    if MODE == 1:
        q = q0 + tl.arange(0, BLOCK_Q)[:, None]
        c = c0 + tl.arange(0, BLOCK_C)[None, :]
        x_off = q * sxw + c
        o_off = q * sow + c
    else:
        c = c0 + tl.arange(0, BLOCK_C)[:, None]
        q = q0 + tl.arange(0, BLOCK_Q)[None, :]
        if MODE == 0:
            x_off = c * sxc + q
            o_off = c * soc + q
        else:
            f = q // (H * W)
            yx = q % (H * W)
            y = yx // W
            xx = yx % W
            x_off = c * sxc + f * sxf + y * sxh + xx * sxw
            o_off = c * soc + f * sof + y * soh + xx * sow
    in_window = (c >= WIN_START) & (c < WIN_STOP)
    if EVEN:
        v = tl.load(x_ptr + n * sxn + x_off).to(tl.float32)
        if HAS_MAP:
            scale = tl.load(map_ptr + n * n_positions + q + c * 0, mask=in_window, other=1.0)
        else:
            scale = tl.where(in_window, b, 1.0)
        tl.store(out_ptr + n * son + o_off, _to_output(v * scale, out_ptr.dtype.element_ty, MANUAL_BF16))
    else:
        inside = (c < CX) & (q < n_positions)
        v = tl.load(x_ptr + n * sxn + x_off, mask=inside, other=0.0).to(tl.float32)
        if HAS_MAP:
            scale = tl.load(map_ptr + n * n_positions + q + c * 0, mask=inside & in_window, other=1.0)
        else:
            scale = tl.where(in_window, b, 1.0)
        tl.store(out_ptr + n * son + o_off, _to_output(v * scale, out_ptr.dtype.element_ty, MANUAL_BF16),
                 mask=inside)


@triton.jit
def _plane_tile(h_ptr, h_planes, rows, cols, shh, shw, plane_ok, H: tl.constexpr, W: tl.constexpr,
                FLAT: tl.constexpr, FULL_P: tl.constexpr, FULL_H: tl.constexpr, FULL_W: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Offsets and mask of a (BLOCK_P, BLOCK_H, BLOCK_W) tile and its values in float32 (0 outside)."""
    y = rows[None, :, None]
    x = cols[None, None, :]
    if FLAT:
        offsets = y * W + x  # row stride W known at compile time: whole rows are vectors
    else:
        offsets = y * shh + x * shw
    if FULL_P and FULL_H and FULL_W:
        # Every lane is in a plane: a constant mask, which the compiler drops (unmasked vector accesses).
        inside = tl.full((BLOCK_P, BLOCK_H, BLOCK_W), True, tl.int1)
    else:
        inside = plane_ok[:, None, None] & (y < H) & (x < W)
    v = tl.load(h_ptr + h_planes[:, None, None] + offsets, mask=inside, other=0.0).to(tl.float32)
    return v, offsets, inside


@triton.jit
def _band_weight(i, j, gain_delta, KY0: tl.constexpr, KX0: tl.constexpr, RADIUS_SQ: tl.constexpr):
    """w_ij: gain_delta where frequency (KY0 + i, KX0 + j) is in the mask (the box: everywhere)."""
    w = gain_delta
    if RADIUS_SQ >= 0:
        ky = KY0 + i
        kx = KX0 + j
        w = tl.where(ky * ky + kx * kx < RADIUS_SQ, gain_delta, 0.0)
    return w


@triton.jit
def _pair_static(tc, ts, uc, us, tab_ptr, rows, gain_delta, I: tl.constexpr, KY: tl.constexpr,
                 KX: tl.constexpr, NY: tl.constexpr, NX: tl.constexpr, RADIUS_SQ: tl.constexpr,
                 BLOCK_W: tl.constexpr, HP: tl.constexpr):
    """uc, us += w (R ca + I sa), w (I ca - R sa) for the constexpr frequency (KY, KX) = row I of the band.

    ky = 0 (ca = 1, sa = 0) loads and multiplies no twiddle; kx = 0 has ts = 0 and needs no us; a radial
    point outside the disc contributes nothing and is dropped at compile time.
    """
    if RADIUS_SQ < 0 or KY * KY + KX * KX < RADIUS_SQ:
        if KY == 0:
            uc += gain_delta * tl.sum(tc, axis=1)[:, None]
            if KX != 0:
                us += gain_delta * tl.sum(ts, axis=1)[:, None]
        else:
            y_tab = tab_ptr + 2 * NX * BLOCK_W
            ca = tl.load(y_tab + I * HP + rows)[None, :]
            sa = tl.load(y_tab + (NY + I) * HP + rows)[None, :]
            if KX == 0:
                wr = gain_delta * tl.sum(ca * tc, axis=1)[:, None]
                wi = gain_delta * tl.sum(sa * tc, axis=1)[:, None]
            else:
                wr = gain_delta * tl.sum(ca * tc - sa * ts, axis=1)[:, None]
                wi = gain_delta * tl.sum(sa * tc + ca * ts, axis=1)[:, None]
            uc += wr * ca + wi * sa
            if KX != 0:
                us += wi * ca - wr * sa
    return uc, us


@triton.jit
def _column_static(v, corr, tab_ptr, rows, cols, gain_delta, J: tl.constexpr,
                   KY0: tl.constexpr, NY: tl.constexpr, KX0: tl.constexpr, NX: tl.constexpr,
                   RADIUS_SQ: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_W: tl.constexpr, HP: tl.constexpr):
    """corr + uc_J(y) cb_J(x) + us_J(y) sb_J(x) for frequency column J of a small (constexpr) band.

    The kx = 0 column (cb = 1, sb = 0) loads and multiplies no twiddle.
    """
    if KX0 + J != 0:
        cb = tl.load(tab_ptr + J * BLOCK_W + cols)[None, None, :]
        sb = tl.load(tab_ptr + (NX + J) * BLOCK_W + cols)[None, None, :]
        tc = tl.sum(v * cb, axis=2)
        ts = tl.sum(v * sb, axis=2)
    else:
        tc = tl.sum(v, axis=2)
        ts = tc  # unused: sb = 0
    uc = tl.zeros((BLOCK_P, BLOCK_H), dtype=tl.float32)
    us = tl.zeros((BLOCK_P, BLOCK_H), dtype=tl.float32)
    for i in tl.static_range(NY):
        uc, us = _pair_static(tc, ts, uc, us, tab_ptr, rows, gain_delta, i, KY0 + i, KX0 + J, NY, NX,
                              RADIUS_SQ, BLOCK_W, HP)
    if KX0 + J == 0:
        corr += uc[:, :, None]
    else:
        corr += uc[:, :, None] * cb + us[:, :, None] * sb
    return corr


@triton.jit
def _column_runtime(v, corr, tab_ptr, rows, cols, gain_delta, j, ny,
                    KY0: tl.constexpr, NY: tl.constexpr, KX0: tl.constexpr, NX: tl.constexpr,
                    RADIUS_SQ: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr,
                    BLOCK_W: tl.constexpr, HP: tl.constexpr):
    """_column_static for a runtime column j with a runtime loop over the band's ny rows."""
    cb = tl.load(tab_ptr + j * BLOCK_W + cols)[None, None, :]
    sb = tl.load(tab_ptr + (NX + j) * BLOCK_W + cols)[None, None, :]
    tc = tl.sum(v * cb, axis=2)
    ts = tl.sum(v * sb, axis=2)
    uc = tl.zeros((BLOCK_P, BLOCK_H), dtype=tl.float32)
    us = tl.zeros((BLOCK_P, BLOCK_H), dtype=tl.float32)
    y_tab = tab_ptr + 2 * NX * BLOCK_W
    for i in range(ny):
        ca = tl.load(y_tab + i * HP + rows)[None, :]
        sa = tl.load(y_tab + (NY + i) * HP + rows)[None, :]
        w = _band_weight(i, j, gain_delta, KY0, KX0, RADIUS_SQ)
        wr = w * tl.sum(ca * tc - sa * ts, axis=1)[:, None]
        wi = w * tl.sum(sa * tc + ca * ts, axis=1)[:, None]
        uc += wr * ca + wi * sa
        us += wi * ca - wr * sa
    return corr + uc[:, :, None] * cb + us[:, :, None] * sb


@triton.jit
def _filter_in_registers(v, g_hi, tab_ptr, rows, cols, gain_delta, nx, ny,
                         KY0: tl.constexpr, NY: tl.constexpr, KX0: tl.constexpr, NX: tl.constexpr,
                         RADIUS_SQ: tl.constexpr, STATIC_BAND: tl.constexpr, BLOCK_P: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, HP: tl.constexpr):
    """g_hi v + the low-rank correction of whole plane tiles held in registers (band unrolled or looped)."""
    corr = g_hi * v
    if STATIC_BAND:
        for j in tl.static_range(NX):
            corr = _column_static(v, corr, tab_ptr, rows, cols, gain_delta, j, KY0, NY, KX0, NX,
                                  RADIUS_SQ, BLOCK_P, BLOCK_H, BLOCK_W, HP)
    else:
        for j in range(nx):
            corr = _column_runtime(v, corr, tab_ptr, rows, cols, gain_delta, j, ny, KY0, NY, KX0, NX,
                                   RADIUS_SQ, BLOCK_P, BLOCK_H, BLOCK_W, HP)
    return corr


@triton.jit
def _moments(v, mom_r, mom_i, fidx, tab_ptr, rows, cols, ny, nx,
             NY: tl.constexpr, NX: tl.constexpr, BLOCK_W: tl.constexpr, HP: tl.constexpr):
    """Add one row chunk's R_ij, I_ij to the (BLOCK_P, NF) one-hot accumulators (swept planes)."""
    y_tab = tab_ptr + 2 * NX * BLOCK_W
    for j in range(nx):
        cb = tl.load(tab_ptr + j * BLOCK_W + cols)[None, None, :]
        sb = tl.load(tab_ptr + (NX + j) * BLOCK_W + cols)[None, None, :]
        tc = tl.sum(v * cb, axis=2)
        ts = tl.sum(v * sb, axis=2)
        for i in range(ny):
            ca = tl.load(y_tab + i * HP + rows)[None, :]
            sa = tl.load(y_tab + (NY + i) * HP + rows)[None, :]
            hot = fidx[None, :] == i * NX + j
            mom_r += tl.where(hot, tl.sum(ca * tc - sa * ts, axis=1)[:, None], 0.0)
            mom_i += tl.where(hot, tl.sum(sa * tc + ca * ts, axis=1)[:, None], 0.0)
    return mom_r, mom_i


@triton.jit
def _update_from_moments(corr, mom_r, mom_i, fidx, tab_ptr, rows, cols, gain_delta, ny, nx,
                         KY0: tl.constexpr, NY: tl.constexpr, KX0: tl.constexpr, NX: tl.constexpr,
                         RADIUS_SQ: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_W: tl.constexpr, HP: tl.constexpr):
    """corr + sum_j uc_j cb_j + us_j sb_j for one row chunk, from the accumulated moments."""
    y_tab = tab_ptr + 2 * NX * BLOCK_W
    for j in range(nx):
        uc = tl.zeros((BLOCK_P, BLOCK_H), dtype=tl.float32)
        us = tl.zeros((BLOCK_P, BLOCK_H), dtype=tl.float32)
        for i in range(ny):
            ca = tl.load(y_tab + i * HP + rows)[None, :]
            sa = tl.load(y_tab + (NY + i) * HP + rows)[None, :]
            hot = fidx[None, :] == i * NX + j
            w = _band_weight(i, j, gain_delta, KY0, KX0, RADIUS_SQ)
            wr = w * tl.sum(tl.where(hot, mom_r, 0.0), axis=1)[:, None]
            wi = w * tl.sum(tl.where(hot, mom_i, 0.0), axis=1)[:, None]
            uc += wr * ca + wi * sa
            us += wi * ca - wr * sa
        cb = tl.load(tab_ptr + j * BLOCK_W + cols)[None, None, :]
        sb = tl.load(tab_ptr + (NX + j) * BLOCK_W + cols)[None, None, :]
        corr += uc[:, :, None] * cb + us[:, :, None] * sb
    return corr


@triton.jit
def _row_twiddles(tab_ptr, rows, NX: tl.constexpr, NY: tl.constexpr, NYP: tl.constexpr,
                  BLOCK_W: tl.constexpr, HP: tl.constexpr):
    """ca[y, i], sa[y, i] as (1, BLOCK_H, 1, NYP) tiles for the chunk's rows (0 for padded i >= NY)."""
    i = tl.arange(0, NYP)[None, None, None, :]
    y = rows[None, :, None, None]
    y_tab = tab_ptr + 2 * NX * BLOCK_W
    live = (i < NY) & (y >= 0)
    ca = tl.load(y_tab + i * HP + y, mask=live, other=0.0)
    sa = tl.load(y_tab + (NY + i) * HP + y, mask=live, other=0.0)
    return ca, sa


@triton.jit
def _column_coefficients(cc, cs, tab_ptr, cols, gain_delta, nx, KY0: tl.constexpr, NY: tl.constexpr,
                         KX0: tl.constexpr, NX: tl.constexpr, NYP: tl.constexpr, RADIUS_SQ: tl.constexpr,
                         BLOCK_W: tl.constexpr):
    """Ux[p, x, i], Vx[p, x, i] from the column sums cc = sum_y v ca_i, cs = sum_y v sa_i (P, BLOCK_W, NYP).

    R_ij = sum_x cb_j cc_i - sb_j cs_i, I_ij = sum_x sb_j cc_i + cb_j cs_i, then
    Ux_i = sum_j w_ij (R_ij cb_j + I_ij sb_j), Vx_i = sum_j w_ij (I_ij cb_j - R_ij sb_j): the update is
    h' = g_hi v + sum_i ca_i(y) Ux_i(x) + sa_i(y) Vx_i(x).
    """
    i = tl.arange(0, NYP)[None, :]
    ux = tl.zeros_like(cc)
    vx = tl.zeros_like(cc)
    for j in range(nx):
        cb = tl.load(tab_ptr + j * BLOCK_W + cols)[None, :, None]
        sb = tl.load(tab_ptr + (NX + j) * BLOCK_W + cols)[None, :, None]
        w = tl.where(i < NY, _band_weight(i, j, gain_delta, KY0, KX0, RADIUS_SQ), 0.0)
        r = (w * tl.sum(cb * cc - sb * cs, axis=1))[:, None, :]
        im = (w * tl.sum(sb * cc + cb * cs, axis=1))[:, None, :]
        ux += r * cb + im * sb
        vx += im * cb - r * sb
    return ux, vx


@triton.jit
def _skip_planes(h_ptr, out_ptr, tab_ptr, s, high_gain, pid, CX, CH, F, n_chunks, ny, nx,
                 shn, shc, shf, shh, shw, son, soc, sof, soh, sow,
                 H: tl.constexpr, W: tl.constexpr, KY0: tl.constexpr, NY: tl.constexpr, KX0: tl.constexpr,
                 NX: tl.constexpr, NF: tl.constexpr, RADIUS_SQ: tl.constexpr, STATIC_BAND: tl.constexpr,
                 BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, HP: tl.constexpr,
                 SWEEP: tl.constexpr, TRANSPOSE: tl.constexpr, FLAT: tl.constexpr, FULL_P: tl.constexpr,
                 FULL_H: tl.constexpr, FULL_W: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """Filter skip planes c' = c0 .. c0 + BLOCK_P - 1 of one (n, f) and store them at channels CX + c'.

    A program's planes are consecutive channels of one (n, f), so with channels_last their addresses are
    provably consecutive (vector accesses along channels).
    """
    c_blocks = tl.cdiv(CH, BLOCK_P)
    nf = pid // c_blocks
    c = (pid % c_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    plane_ok = c < CH  # lanes past CH only make masked (no) accesses
    n = (nf // F).to(tl.int64)
    f = nf % F
    h_planes = c * shc
    o_planes = (CX + c) * soc
    h_ptr += n * shn + f * shf
    out_ptr += n * son + f * sof
    g_hi = tl.cast(high_gain, tl.float32)
    gain_delta = (s - g_hi) / (H * W)
    cols = tl.arange(0, BLOCK_W)
    rows0 = tl.arange(0, BLOCK_H)
    out_dtype = out_ptr.dtype.element_ty
    if SWEEP == 0:
        # The whole plane tile is in registers: read once, reduce, update, write.
        v, offsets, inside = _plane_tile(h_ptr, h_planes, rows0, cols, shh, shw, plane_ok, H, W,
                                         FLAT, FULL_P, FULL_H, FULL_W, BLOCK_P, BLOCK_H, BLOCK_W)
        if TRANSPOSE:
            # Reduce over y first (the axis with fewer lanes when channels hold the lanes): the same
            # algorithm on the transposed tile, with the roles of (y, ky) and (x, kx) swapped; the launcher
            # lays the table out y-axis first.
            corr = _filter_in_registers(tl.permute(v, (0, 2, 1)), g_hi, tab_ptr, cols, rows0, gain_delta, ny, nx,
                                        KX0, NX, KY0, NY, RADIUS_SQ, STATIC_BAND, BLOCK_P, BLOCK_W, BLOCK_H,
                                        BLOCK_W)
            corr = tl.permute(corr, (0, 2, 1))
        else:
            corr = _filter_in_registers(v, g_hi, tab_ptr, rows0, cols, gain_delta, nx, ny, KY0, NY, KX0, NX,
                                        RADIUS_SQ, STATIC_BAND, BLOCK_P, BLOCK_H, BLOCK_W, HP)
        if not FLAT:
            offsets = rows0[None, :, None] * soh + cols[None, None, :] * sow
        tl.store(out_ptr + o_planes[:, None, None] + offsets, _to_output(corr, out_dtype, MANUAL_BF16),
                 mask=inside)
    elif SWEEP == 2:
        # Large planes whose row chunks keep whole rows inside each thread's registers (channels_last:
        # channels and x hold the lanes): sweep 1 accumulates column sums cc_i(x) = sum_y v ca_i(y) and
        # cs_i(x) elementwise (no reduction across lanes per chunk), one reduction over x per plane gives
        # the moments, and sweep 2 (second read from L2) applies sum_i ca_i(y) Ux_i(x) + sa_i(y) Vx_i(x).
        cc = tl.zeros((BLOCK_P, BLOCK_W, NF), dtype=tl.float32)
        cs = tl.zeros((BLOCK_P, BLOCK_W, NF), dtype=tl.float32)
        for chunk in range(n_chunks):
            rows = rows0 + chunk * BLOCK_H
            v, offsets, inside = _plane_tile(h_ptr, h_planes, rows, cols, shh, shw, plane_ok, H, W,
                                             FLAT, FULL_P, FULL_H, FULL_W, BLOCK_P, BLOCK_H, BLOCK_W)
            ca, sa = _row_twiddles(tab_ptr, rows, NX, NY, NF, BLOCK_W, HP)
            cc += tl.sum(v[:, :, :, None] * ca, axis=1)
            cs += tl.sum(v[:, :, :, None] * sa, axis=1)
        ux, vx = _column_coefficients(cc, cs, tab_ptr, cols, gain_delta, nx, KY0, NY, KX0, NX, NF, RADIUS_SQ,
                                      BLOCK_W)
        for chunk in range(n_chunks):
            rows = rows0 + chunk * BLOCK_H
            v, offsets, inside = _plane_tile(h_ptr, h_planes, rows, cols, shh, shw, plane_ok, H, W,
                                             FLAT, FULL_P, FULL_H, FULL_W, BLOCK_P, BLOCK_H, BLOCK_W)
            ca, sa = _row_twiddles(tab_ptr, rows, NX, NY, NF, BLOCK_W, HP)
            corr = g_hi * v + tl.sum(ca * ux[:, None, :, :] + sa * vx[:, None, :, :], axis=3)
            if not FLAT:
                offsets = rows[None, :, None] * soh + cols[None, None, :] * sow
            tl.store(out_ptr + o_planes[:, None, None] + offsets, _to_output(corr, out_dtype, MANUAL_BF16),
                     mask=inside)
    else:
        # Planes larger than a tile: sweep 1 takes the moments over row chunks, sweep 2 reads again
        # (from L2), updates and writes.
        fidx = tl.arange(0, NF)
        mom_r = tl.zeros((BLOCK_P, NF), dtype=tl.float32)
        mom_i = tl.zeros((BLOCK_P, NF), dtype=tl.float32)
        for chunk in range(n_chunks):
            rows = rows0 + chunk * BLOCK_H
            v, offsets, inside = _plane_tile(h_ptr, h_planes, rows, cols, shh, shw, plane_ok, H, W,
                                             FLAT, FULL_P, FULL_H, FULL_W, BLOCK_P, BLOCK_H, BLOCK_W)
            mom_r, mom_i = _moments(v, mom_r, mom_i, fidx, tab_ptr, rows, cols, ny, nx, NY, NX, BLOCK_W, HP)
        for chunk in range(n_chunks):
            rows = rows0 + chunk * BLOCK_H
            v, offsets, inside = _plane_tile(h_ptr, h_planes, rows, cols, shh, shw, plane_ok, H, W,
                                             FLAT, FULL_P, FULL_H, FULL_W, BLOCK_P, BLOCK_H, BLOCK_W)
            corr = _update_from_moments(g_hi * v, mom_r, mom_i, fidx, tab_ptr, rows, cols, gain_delta, ny, nx,
                                        KY0, NY, KX0, NX, RADIUS_SQ, BLOCK_P, BLOCK_H, BLOCK_W, HP)
            if not FLAT:
                offsets = rows[None, :, None] * soh + cols[None, None, :] * sow
            tl.store(out_ptr + o_planes[:, None, None] + offsets, _to_output(corr, out_dtype, MANUAL_BF16),
                     mask=inside)


@triton.jit
def freeu_concat_kernel(
    x_ptr, h_ptr, out_ptr, map_ptr, tab_ptr, b_ptr, s_ptr,
    b_val, s_val, high_gain,
    n_skip_programs, CX, CH, F, n_chunks, ny, nx,
    n_positions, c_blocks, q_blocks, WIN_START, WIN_STOP,
    sxn, sxc, sxf, sxh, sxw,
    shn, shc, shf, shh, shw,
    son, soc, sof, soh, sow,
    H: tl.constexpr, W: tl.constexpr,
    KY0: tl.constexpr, NY: tl.constexpr, KX0: tl.constexpr, NX: tl.constexpr, NF: tl.constexpr,
    RADIUS_SQ: tl.constexpr, STATIC_BAND: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, HP: tl.constexpr,
    SWEEP: tl.constexpr, TRANSPOSE: tl.constexpr, FLAT: tl.constexpr, FULL_P: tl.constexpr,
    FULL_H: tl.constexpr, FULL_W: tl.constexpr,
    BACKBONE_MODE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr, BACKBONE_EVEN: tl.constexpr,
    HAS_MAP: tl.constexpr, FACTORS_IN_MEMORY: tl.constexpr, MANUAL_BF16: tl.constexpr, ROLE: tl.constexpr,
):
    """One launch: programs [0, n_skip_programs) filter skip planes, the others copy the scaled backbone."""
    pid = tl.program_id(0)
    if FACTORS_IN_MEMORY:
        b = tl.load(b_ptr).to(tl.float32)
        s = tl.load(s_ptr).to(tl.float32)
    else:
        b = tl.cast(b_val, tl.float32)
        s = tl.cast(s_val, tl.float32)
    if ROLE == 1:
        _skip_planes(h_ptr, out_ptr, tab_ptr, s, high_gain, pid, CX, CH, F, n_chunks, ny, nx,
                     shn, shc, shf, shh, shw, son, soc, sof, soh, sow, H, W, KY0, NY, KX0, NX, NF,
                     RADIUS_SQ, STATIC_BAND, BLOCK_P, BLOCK_H, BLOCK_W, HP, SWEEP, TRANSPOSE, FLAT, FULL_P, FULL_H,
                     FULL_W, MANUAL_BF16)
    elif ROLE == 2:
        _backbone_tile(x_ptr, out_ptr, map_ptr, b, pid - n_skip_programs, CX, n_positions, c_blocks, q_blocks,
                       WIN_START, WIN_STOP, sxn, sxc, sxf, sxh, sxw, son, soc, sof, soh, sow, H, W,
                       BACKBONE_MODE, BLOCK_C, BLOCK_Q, BACKBONE_EVEN, HAS_MAP, MANUAL_BF16)
    else:
        if pid < n_skip_programs:
            _skip_planes(h_ptr, out_ptr, tab_ptr, s, high_gain, pid, CX, CH, F, n_chunks, ny,
                         nx, shn, shc, shf, shh, shw, son, soc, sof, soh, sow, H, W, KY0, NY, KX0, NX, NF,
                         RADIUS_SQ, STATIC_BAND, BLOCK_P, BLOCK_H, BLOCK_W, HP, SWEEP, TRANSPOSE, FLAT, FULL_P, FULL_H,
                         FULL_W, MANUAL_BF16)
        else:
            _backbone_tile(x_ptr, out_ptr, map_ptr, b, pid - n_skip_programs, CX, n_positions, c_blocks,
                           q_blocks, WIN_START, WIN_STOP, sxn, sxc, sxf, sxh, sxw, son, soc, sof, soh, sow,
                           H, W, BACKBONE_MODE, BLOCK_C, BLOCK_Q, BACKBONE_EVEN, HAS_MAP, MANUAL_BF16)
