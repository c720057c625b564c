"""The "torch" backend: FreeU at one concat in plain PyTorch, no complex tensors on the low-rank path, any device.

Math (docs/design.md section 2, in real arithmetic). Per plane h (H x W), with twiddle tables
``Ey = [cos(2 pi ky y / H) | sin(2 pi ky y / H)]`` (H x 2ny) and ``Ex`` likewise (W x 2nx):

    M  = Ey^T h Ex                      (2ny x 2nx): Scc, Scs / Ssc, Sss for every grid frequency
    R  = Scc - Sss,  I = Ssc + Scs      so that X(k) = R_k - i I_k
    Qr = w * R,      Qi = w * I         w_k = (s - g_hi) [k in K] / (H W)
    h' = g_hi h + Ey [[Qr, Qi], [Qi, -Qr]] Ex^T

because Re(X(k) e^{i(a + b)}) = R (cos a cos b - sin a sin b) + I (sin a cos b + cos a sin b).
The map from M to the coefficient matrix is one fixed small matrix T (see _coefficient_map). A call
works on every plane at once, in a fixed number of ops whatever the shape and dtype (about a dozen,
counted in tests/test_torch_backend.py; each op is one kernel launch on an accelerator and one parallel
region on the CPU): one thin "moment GEMM" over the data, three small GEMMs on 2nx/W of it, and the
rank-2nx update as one batched GEMM over the samples that writes the output slice directly (beta =
g_hi). Planes of up to 256 elements use the Kronecker table Ey (x) Ex instead, so the moments and the
update are each a single GEMM. Low-precision planes are converted once to a float32 copy (the one
full-size temporary), updated there in place and rounded once into the output. Only spec.band is read
(never spec.threshold), so any band, unequal per axis included, is computed as given.

Thread count: every reduction is inside a GEMM (or, on the FFT path, an FFT) whose split of the work
over threads does not change the order of any sum, so the output bits do not depend on
torch.set_num_threads on the CPU (tested on 1 and 2 threads, tests/test_torch_backend.py).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from ..spec import FreeUSpec, allocate_output

__all__ = ["fused_concat_torch", "twiddle_table", "filter_skip_fft", "write_backbone"]

_TWIDDLES: Dict[Tuple, torch.Tensor] = {}


def twiddle_table(size: int, k0: int, count: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(size, 2 * count) table ``[cos(2 pi k n / size) | sin(2 pi k n / size)]`` for k = k0 .. k0 + count - 1.

    ``k n`` is reduced modulo size in integers before the angle is formed, so the table is exact to the
    last bit for any plane size. Cached per device and dtype; the cache is read-only after the first call
    for a shape, which keeps CUDA graph capture free of host-to-device copies.
    """
    key = (size, k0, count, device, dtype)
    table = _TWIDDLES.get(key)
    if table is None:
        n = torch.arange(size, dtype=torch.int64)
        k = torch.arange(k0, k0 + count, dtype=torch.int64)
        angle = (torch.remainder(n[:, None] * k[None, :], size).to(torch.float64)) * (2 * math.pi / size)
        table = torch.cat([torch.cos(angle), torch.sin(angle)], dim=1).to(device=device, dtype=dtype)
        _TWIDDLES[key] = table
    return table


def write_backbone(out_x: torch.Tensor, x: torch.Tensor, b: torch.Tensor, spec: FreeUSpec, scale_map) -> None:
    """out_x = x with channels [start, stop) scaled by b (v1) or by (b - 1) m^ + 1 (v2, scale_map given).

    The scale is applied in float32 (a float32 0-d b, or the float32 map) and rounded once into out_x.
    """
    start, stop = spec.window
    cx = spec.backbone_channels_total
    if start > 0:
        out_x[:, :start].copy_(x[:, :start])
    if stop < cx:
        out_x[:, stop:].copy_(x[:, stop:])
    if stop > start:
        if scale_map is not None:
            factor = scale_map.unsqueeze(1)
        elif b.device.type == "cpu" and x.device.type == "cpu":
            factor = b.item()  # a host scalar: the multiply runs in float32 "opmath" without a tensor operand
        else:
            factor = b
        torch.mul(x[:, start:stop], factor, out=out_x[:, start:stop])


# Planes up to this many elements use one Kronecker table (H W x 4 ny nx) instead of the separable pair:
# a single GEMM over all planes beats thin products over plane rows of a few elements (SD 1.5's 8x8 and
# 16x16 planes; measured on a 2-vCPU EPYC).
_KRONECKER_MAX_PLANE = 256


def _coefficient_map(band) -> torch.Tensor:
    """The dense float64 map T from the moments M to the update's coefficients Q: vec(Q) = vec(M) @ T.

    M holds [[Scc, Scs], [Ssc, Sss]] as a (2ny, 2nx) grid (rows a, columns b), Q is [[Qr, Qi], [Qi, -Qr]]
    in the same layout, both flattened row-major, with Qr = w (Scc - Sss), Qi = w (Ssc + Scs) and w the
    mask weight of the grid point. Each coefficient is a signed, weighted sum of exactly two moments.
    """
    ny, nx = band.ny, band.nx
    weight = band.weight_table(torch.float64)
    dense = torch.zeros(4 * ny * nx, 4 * ny * nx, dtype=torch.float64)
    for row in range(2 * ny):
        for col in range(2 * nx):
            i, j = row % ny, col % nx
            cc, cs = i * 2 * nx + j, i * 2 * nx + nx + j
            sc, ss = (ny + i) * 2 * nx + j, (ny + i) * 2 * nx + nx + j
            w = float(weight[i, j])
            produced = row * 2 * nx + col
            if (row < ny) == (col < nx):  # (cos, cos) holds Qr = w (Scc - Sss); (sin, sin) holds -Qr
                sign = 1.0 if row < ny else -1.0
                dense[cc, produced] += sign * w
                dense[ss, produced] -= sign * w
            else:  # the mixed blocks hold Qi = w (Ssc + Scs)
                dense[sc, produced] += w
                dense[cs, produced] += w
    return dense


class _LowRankFactors:
    """The filter of one plane shape and band as ``h' = g_hi h + gain * left(h) @ right`` on rows of planes.

    Two forms, chosen by plane size; both begin with one "moment GEMM" that reduces every row of the
    data against a few twiddle columns, and end with one batched GEMM per call that adds the update.

    Separable (rows are plane rows, length W): ``A = rows Ex`` (P H, 2nx); the moments ``M_p = Ey^T A_p``
    (P, 2ny, 2nx) from one batched GEMM, mapped to the coefficients by one GEMM with the map T, and
    expanded by one batched GEMM ``left_p = Ey Q_p`` (H, 2nx); right = Ex^T. After the moment GEMM
    everything up to the update works on 2nx/W of the data.

    Kronecker (small planes; rows are whole planes, length H W): K = Ey (x) Ex, ``left = rows K`` (the
    moments) and ``right = T K^T``.

    Everything is built once per (plane shape, band, device, dtype) and read-only afterwards; the gain
    ``(s - g_hi) / (H W)`` multiplies the small ``coefficients`` (separable) or ``right`` (Kronecker) per
    call, so a changing s costs no rebuild. The number of ops per call is fixed: it depends on neither
    the shape nor the dtype (tests/test_torch_backend.py counts them).
    """

    def __init__(self, spec: FreeUSpec, device: torch.device, compute: torch.dtype):
        band = spec.band
        self.height = spec.height
        ey = twiddle_table(spec.height, band.ky0, band.ny, device, compute)
        ex = twiddle_table(spec.width, band.kx0, band.nx, device, compute)
        coefficient_map = _coefficient_map(band)
        self.kronecker = spec.plane_size <= _KRONECKER_MAX_PLANE
        if self.kronecker:
            # (H W, 2ny * 2nx): column (a, b) holds Ey[y, a] Ex[x, b].
            self.table = (ey[:, None, :, None] * ex[None, :, None, :]).reshape(spec.plane_size, -1)
            self.unit_right = coefficient_map.to(device=device, dtype=compute) @ self.table.t()
            self.row_length = spec.plane_size
        else:
            self.ey = ey
            self.table = ex
            self.coefficients = coefficient_map.to(device=device, dtype=compute)
            self.unit_right = ex.t().contiguous()
            self.row_length = spec.width

    def left_and_right(self, rows: torch.Tensor, gain: torch.Tensor):
        """The update's factors for rows (R, row_length) of whole planes: left (R, r), right (r, row_length).

        ``gain`` is the call's 0-d (s - g_hi) / (H W). Every product keeps the long axis (the rows) as
        the GEMM's M dimension, which the BLAS splits over threads; its K dimension (W, H or H W) is
        never split, so no sum's order depends on the thread count. (The transposed, "wide" moment GEMM
        ``table^T rows^T`` is faster on MKL but its result changes in the last bit with the thread count.)
        """
        products = rows @ self.table  # the moment GEMM: (R, r)
        if self.kronecker:
            return products, self.unit_right * gain
        planes, two_nx = rows.shape[0] // self.height, products.shape[1]
        moments = torch.matmul(self.ey.t(), products.view(planes, self.height, two_nx))  # (P, 2ny, 2nx)
        coefficients = moments.view(planes, -1) @ (self.coefficients * gain)  # (P, (a, b)) row-major
        left = torch.matmul(self.ey, coefficients.view(planes, -1, two_nx))  # (P, H, 2nx): Ey Q_p
        return left.view(-1, two_nx), self.unit_right


_FACTORS: Dict[Tuple, _LowRankFactors] = {}


def _low_rank_factors(spec: FreeUSpec, device: torch.device, compute: torch.dtype) -> _LowRankFactors:
    """The cached _LowRankFactors of a plane shape and band (built once, read-only afterwards)."""
    key = (spec.height, spec.width, spec.band, device, compute)
    factors = _FACTORS.get(key)
    if factors is None:
        factors = _FACTORS[key] = _LowRankFactors(spec, device, compute)
    return factors


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 planes are filtered in float64, every other dtype in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _view_or_none(t: torch.Tensor, shape) -> Optional[torch.Tensor]:
    """t viewed (no copy) with this shape, or None if its strides allow no such view."""
    try:
        return t.view(shape)
    except RuntimeError:
        return None


def _filter_lowrank(h: torch.Tensor, out_h: torch.Tensor, spec: FreeUSpec, s: torch.Tensor) -> None:
    """out_h = g_hi h + left @ right for every plane (the low-rank filter), in a fixed number of ops.

    All planes at once: h as rows (R, row_length) in logical order (one copy if its layout has no such
    view, e.g. channels_last), converted once to the float32 compute dtype if it is of lower precision;
    the factors from _LowRankFactors; then one batched GEMM over the N samples, ``left @ right``, and one
    add of ``g_hi h``. A float32/float64 output slice whose layout has the rows view (each sample's
    planes are one contiguous block of the output even though the output interleaves the backbone
    channels) is written by the GEMM directly; otherwise the product goes to one temporary and the add
    writes the output (the single rounding of a low-precision output). At most one full-size temporary
    is alive at a time.
    """
    compute = _compute_dtype(spec.dtype)
    factors = _low_rank_factors(spec, h.device, compute)
    length = factors.row_length
    gain = (s.to(compute) - spec.high_gain) / spec.plane_size
    flat = _view_or_none(h, (-1, length))  # the moment GEMM takes every row of every sample at once
    flat = (h.reshape(-1, length) if flat is None else flat).to(compute)  # rows in logical order
    left, right = factors.left_and_right(flat, gain)
    rows = flat.view(h.shape[0], -1, length)
    left = left.view(rows.shape[0], rows.shape[1], -1)
    right = right.expand(rows.shape[0], -1, -1)
    # The update as a plain batched GEMM and one elementwise add, out = left @ right + g_hi h: MKL's GEMM
    # with a beta term (baddbmm, beta = g_hi) rounds differently with the thread count, without it not.
    target = _view_or_none(out_h, rows.shape) if h.dtype == compute else None
    if target is not None:  # the GEMM writes the output slice, the add updates it in place
        torch.bmm(left, right, out=target)
        target.add_(rows, alpha=spec.high_gain)
        return
    # Any other layout or dtype: the product in a compute-dtype temporary (the float32 copy of a
    # low-precision h is released first), added to h itself into the output (one rounding).
    del flat, rows
    product = torch.bmm(left, right).view(h.shape)
    # In place, then one cast into the output: an out= add of mixed dtypes would widen h and the sum into
    # two more full-size float32 temporaries first. Same arithmetic and the same single rounding.
    product.add_(h, alpha=spec.high_gain)
    out_h.copy_(product)


_FFT_GAINS: Dict[Tuple, torch.Tensor] = {}


def _fft_mask(spec: FreeUSpec, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(H, W // 2 + 1) half-spectrum weights m_sym(k) = (m(k) + m(-k)) / 2, m the 0/1 mask of the band.

    Cached per plane shape, band, device and dtype; the call's gains are g_hi + (s - g_hi) m_sym.
    """
    band = spec.band
    height, width = spec.height, spec.width
    key = (height, width, band, device, dtype)
    table = _FFT_GAINS.get(key)
    if table is None:
        mask = torch.zeros(height, width, dtype=torch.float64)
        ky = torch.arange(band.ky0, band.ky0 + band.ny) % height
        kx = torch.arange(band.kx0, band.kx0 + band.nx) % width
        mask[ky[:, None], kx[None, :]] = band.weight_table(torch.float64)
        mirror_y, mirror_x = (-torch.arange(height)) % height, (-torch.arange(width)) % width
        table = 0.5 * (mask + mask[mirror_y][:, mirror_x])
        table = _FFT_GAINS[key] = table[:, : width // 2 + 1].to(device=device, dtype=dtype)
    return table


def filter_skip_fft(h: torch.Tensor, spec: FreeUSpec, s: torch.Tensor) -> torch.Tensor:
    """The filter through a real FFT, for masks with too many frequencies for the low-rank path.

    Re(ifft2(G X)) = ifft2(G_sym X) with G_sym(k) = (G(k) + G(-k)) / 2, and G_sym is Hermitian, so a
    half-spectrum rfft2/irfft2 pair with the symmetrised gains is exact for real h. With G = g_hi +
    (s - g_hi) m: G_sym = g_hi + (s - g_hi) m_sym (_fft_mask). Returns the filtered planes in the
    compute dtype (float32, or float64 for float64 input).
    """
    compute = _compute_dtype(spec.dtype)
    gains = _fft_mask(spec, h.device, compute) * (s.to(device=h.device, dtype=compute) - spec.high_gain)
    gains += spec.high_gain
    spectrum = torch.fft.rfft2(h.to(compute))
    spectrum *= gains
    return torch.fft.irfft2(spectrum, s=(spec.height, spec.width))


def fused_concat_torch(
    x: torch.Tensor, h: torch.Tensor, b: torch.Tensor, s: torch.Tensor, spec: FreeUSpec, scale_map=None
) -> torch.Tensor:
    """FreeU at one concat in PyTorch ops, writing straight into the slices of one output tensor.

    ``b`` and ``s`` are 0-d tensors (float32, or float64 for float64 inputs); ``scale_map`` is the v2
    structure map (None for version 1).
    """
    cx = spec.backbone_channels_total
    out = allocate_output(x, spec.skip_channels)
    write_backbone(out[:, :cx], x, b, spec, scale_map)
    out_h = out[:, cx:]
    if h.numel() == 0:
        return out
    if spec.band.empty:
        torch.mul(h, spec.high_gain, out=out_h)
    elif spec.uses_fft_fallback:
        out_h.copy_(filter_skip_fft(h, spec, s))
    else:
        _filter_lowrank(h, out_h, spec, s)
    return out
