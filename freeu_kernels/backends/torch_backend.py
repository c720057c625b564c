"""The "torch" backend: FreeU at one concat in plain PyTorch, no FFT, no complex tensors, any device.

Math (DESIGN.md section 2, in real arithmetic). Per plane h (H x W), with twiddle tables
``Ey = [cos(2 pi ky y / H) | sin(2 pi ky y / H)]`` (H x 2ny) and ``Ex`` likewise (W x 2nx):

    M  = Ey^T h Ex                      (2ny x 2nx): Scc, Scs / Ssc, Sss for every grid frequency
    R  = Scc - Sss,  I = Ssc + Scs      so that X(k) = R_k - i I_k
    Qr = w * R,      Qi = w * I         w_k = (s - g_hi) [k in K] / (H W)
    h' = g_hi h + Ey [[Qr, Qi], [Qi, -Qr]] Ex^T

because Re(X(k) e^{i(a + b)}) = R (cos a cos b - sin a sin b) + I (sin a cos b + cos a sin b).
The map from M to the coefficient matrix is one fixed small matrix T (see _coefficient_map), folded
with the expansion by Ey into one small table, so a call is: one thin "moment GEMM" over the data, two
small matmuls, and the rank-2nx update as one ``addmm`` per sample that writes the output slice
directly (beta = g_hi). Planes of up to 256 elements use the Kronecker table Ey (x) Ex instead, so the
moments and the update are each a single GEMM over every plane. h is read twice and the output written
once. bfloat16 on the CPU updates straight from the input with
split operands (a = a_hi + a_lo, exact to 2^-16) in one bfloat16 GEMM, which accumulates in float32 and
rounds once; its moments, and those of every other low-precision case, come from float32 copies of h
made a chunk at a time, so no full-size float32 temporary is ever allocated.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from ..spec import FreeUSpec, allocate_output

__all__ = ["fused_concat_torch", "twiddle_table", "filter_skip_fft", "write_backbone"]

_TWIDDLES: Dict[Tuple, torch.Tensor] = {}

# Planes whose float32 copy is made at once for the moments of a low-precision input (about 4 MiB).
_CHUNK_ELEMENTS = 1 << 20


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


def _coefficient_gathers(band) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """How the update's coefficients Q come from the moments M: Q = M[first] * c1 + M[second] * c2.

    M holds [[Scc, Scs], [Ssc, Sss]] as rows (a, b) of a (2ny, 2nx) grid flattened row-major. Q is
    [[Qr, Qi], [Qi, -Qr]] with Qr = w (Scc - Sss) and Qi = w (Ssc + Scs), w the mask weight of the grid
    point, produced in (b, a) order (column-block first), the order the expansion by Ey consumes. Each
    coefficient is a signed, weighted sum of exactly two moments, so two row gathers and two multiplies
    replace a dense (4 ny nx)^2 map: linear, not quadratic, in the number of masked frequencies.
    Returns (first, second, c1, c2): int64 row indices and float64 (4 ny nx, 1) coefficients.
    """
    ny, nx = band.ny, band.nx
    weight = band.weight_table(torch.float64)
    first, second, c1, c2 = [], [], [], []
    for col in range(2 * nx):
        for row in range(2 * ny):
            i, j = row % ny, col % nx
            cc, cs = i * 2 * nx + j, i * 2 * nx + nx + j
            sc, ss = (ny + i) * 2 * nx + j, (ny + i) * 2 * nx + nx + j
            w = float(weight[i, j])
            if (row < ny) == (col < nx):  # (cos, cos) holds Qr = w (Scc - Sss); (sin, sin) holds -Qr
                sign = 1.0 if row < ny else -1.0
                first.append(cc), second.append(ss), c1.append(sign * w), c2.append(-sign * w)
            else:  # the mixed blocks hold Qi = w (Ssc + Scs)
                first.append(sc), second.append(cs), c1.append(w), c2.append(w)
    column = lambda v: torch.tensor(v, dtype=torch.float64).view(-1, 1)  # noqa: E731
    return torch.tensor(first), torch.tensor(second), column(c1), column(c2)


def _coefficient_map(band) -> torch.Tensor:
    """The same map as a dense float64 matrix T, vec(Q) = vec(M) @ T, both flattened row-major (a, b).

    For the Kronecker form, where T is folded into the right factor once and costs nothing per call.
    """
    first, second, c1, c2 = _coefficient_gathers(band)
    two_ny, two_nx = 2 * band.ny, 2 * band.nx
    produced = torch.arange(first.numel())  # (b, a) order -> column a * 2nx + b
    column = (produced % two_ny) * two_nx + produced // two_ny
    dense = torch.zeros(first.numel(), first.numel(), dtype=torch.float64)
    dense.index_put_((first, column), c1.view(-1), accumulate=True)
    dense.index_put_((second, column), c2.view(-1), accumulate=True)
    return dense


def _updates_low_precision_directly(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the update of low-precision planes reads them straight from the input.

    True for bfloat16 on the CPU, where oneDNN's bfloat16 GEMM accumulates in float32 and applies beta
    before its single rounding, which _split_rows relies on (the accuracy tests pin it). Elsewhere the
    update runs in the float32 workspace and is rounded into the output by a copy.
    """
    return dtype == torch.bfloat16 and device.type == "cpu"


class _LowRankFactors:
    """The filter of one call as ``h' = g_hi h + left @ right`` on rows of the planes.

    Two forms, chosen by plane size; both start with one "moment GEMM" ``table^T @ rows^T`` that
    reduces every row of the data against a few twiddle columns, and both keep the thin factors in the
    wide orientation (r, rows): thin-and-tall tensors of 4 to 16 columns are several times slower to
    multiply, convert and concatenate on the CPU than their transposes (measured).

    Separable (rows are plane rows, length W): ``A = Ex^T rows^T`` (2nx, P H); per plane the (2ny, 2nx)
    moments ``M = Ey^T A_p^T``, gathered as M^T (4 ny nx, P); the coefficients Q^T from two row gathers
    (_coefficient_gathers); ``left^T[b'] = Q[:, :, b'] Ey^T`` (P, H) for each of the 2nx columns b';
    right = Ex^T. After the moment GEMM everything up to the update works on 2nx/W of the data.

    Kronecker (small planes; rows are whole planes, length H W): K = Ey (x) Ex, ``left^T = K^T rows^T``
    (the moments) and ``right = T K^T`` with the dense coefficient map T (_coefficient_map).

    The tables depend on the plane shape and the band only; the gain ``(s - g_hi) / (H W)`` multiplies
    ``right`` (a few rows of W or H W) per call, so a changing s costs no rebuild.
    """

    def __init__(self, spec: FreeUSpec, device: torch.device, compute: torch.dtype):
        band = spec.band
        self.height = spec.height
        ey = twiddle_table(spec.height, band.ky0, band.ny, device, compute)
        ex = twiddle_table(spec.width, band.kx0, band.nx, device, compute)
        self.kronecker = spec.plane_size <= _KRONECKER_MAX_PLANE
        if self.kronecker:
            coefficient_map = _coefficient_map(band).to(device=device, dtype=compute)
            # (H W, 2ny * 2nx): column (a, b) holds Ey[y, a] Ex[x, b].
            self.table = (ey[:, None, :, None] * ex[None, :, None, :]).reshape(spec.plane_size, -1)
            self.unit_right = coefficient_map @ self.table.t()
        else:
            first, second, c1, c2 = _coefficient_gathers(band)
            self.first, self.second = first.to(device), second.to(device)
            self.c1, self.c2 = c1.to(device=device, dtype=compute), c2.to(device=device, dtype=compute)
            self.ey = ey
            self.table = ex
            self.unit_right = ex.t()
        self.row_length = self.unit_right.shape[1]

    def right(self, gain: torch.Tensor) -> torch.Tensor:
        """The update's right factor for this call's gain, a 0-d tensor."""
        return self.unit_right * gain

    def rows(self, planes: torch.Tensor) -> torch.Tensor:
        """The planes (p, H, W) as the 2-D rows the update works on."""
        return planes.reshape(-1, self.row_length)

    def left_t(self, products: torch.Tensor) -> torch.Tensor:
        """The update's left factor, transposed (r, rows), from the moment GEMM's ``table^T rows^T``."""
        if self.kronecker:
            return products
        two_nx = products.shape[0]
        count = products.shape[1] // self.height
        # (2ny, 2nx P) viewed as M^T (4 ny nx, P), rows in (a, b) order.
        moments_t = (self.ey.t() @ products.view(-1, self.height).t()).view(-1, count)
        coefficients_t = moments_t.index_select(0, self.first) * self.c1
        coefficients_t.addcmul_(moments_t.index_select(0, self.second), self.c2)
        # (2nx, 2ny, P): per column b', Q[:, :, b']^T; left^T[b'] = Q[:, :, b'] Ey^T.
        per_column = coefficients_t.view(two_nx, -1, count).transpose(1, 2)
        return torch.bmm(per_column, self.ey.t().expand(two_nx, -1, -1)).view(two_nx, -1)


_FACTORS: Dict[Tuple, _LowRankFactors] = {}


def _low_rank_factors(spec: FreeUSpec, device: torch.device, compute: torch.dtype) -> _LowRankFactors:
    """The cached _LowRankFactors of a plane shape and band (built once, read-only afterwards)."""
    key = (spec.height, spec.width, spec.band, device, compute)
    factors = _FACTORS.get(key)
    if factors is None:
        factors = _FACTORS[key] = _LowRankFactors(spec, device, compute)
    return factors


_WEIGHTS: Dict[Tuple, torch.Tensor] = {}


def _weight_table(band, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """band.weight_table on the device, cached (no host-to-device copy per call, so CUDA graphs capture)."""
    key = (band, device, dtype)
    table = _WEIGHTS.get(key)
    if table is None:
        table = _WEIGHTS[key] = band.weight_table(dtype).to(device)
    return table


def _filter_lowrank(h: torch.Tensor, out_h: torch.Tensor, spec: FreeUSpec, s: torch.Tensor) -> None:
    """out_h = g_hi h + left @ right for every plane (the low-rank filter); out_h written once.

    Works one sample at a time (a sample's planes are one strided block of the output). float32/float64
    planes are filtered with one moment GEMM, two small matmuls and one ``addmm`` that writes the output
    directly. Low-precision planes are handled in equal chunks of about _CHUNK_ELEMENTS: converted into
    a small float32 workspace for the moments (float32 accuracy, and no full-size temporary), then
    updated: bfloat16 on the CPU straight from the input with split operands (see _split_rows), which
    accumulates in float32 and rounds once; otherwise in the workspace, rounded once into the output.
    """
    compute = torch.float64 if spec.dtype == torch.float64 else torch.float32
    factors = _low_rank_factors(spec, h.device, compute)
    right = factors.right((s.to(compute) - spec.high_gain) / spec.plane_size)
    height, width, length = spec.height, spec.width, factors.row_length
    direct = h.dtype == compute
    # Low-precision planes go through a float32 workspace a chunk at a time, in equal chunks.
    planes_per_sample = spec.skip_channels * spec.frames
    chunks = 1 if direct else -(-planes_per_sample * spec.plane_size // _CHUNK_ELEMENTS)
    step = max(1, -(-planes_per_sample // chunks))
    workspace = None
    split_right = None
    if not direct and _updates_low_precision_directly(h.dtype, h.device):
        right_hi = right.to(h.dtype)
        split_right = torch.cat([right_hi, (right - right_hi.to(compute)).to(h.dtype), right_hi], dim=0)
    for n in range(spec.batch):
        planes = h[n].reshape(-1, height, width)
        sample_out = out_h[n]
        viewable = _is_view_compatible(sample_out, (-1, length))
        # A layout whose rows can't be viewed flat (channels_last) is filled through one temporary.
        target = sample_out.view(planes.shape) if viewable else torch.empty(planes.shape, dtype=h.dtype,
                                                                             device=h.device)
        for begin in range(0, planes.shape[0], step):
            src = factors.rows(planes[begin : begin + step])
            dst = target[begin : begin + step].view(-1, length)
            if direct:
                left_t = factors.left_t(factors.table.t() @ src.t())
                torch.addmm(src, left_t.t(), right, beta=spec.high_gain, out=dst)
                continue
            if workspace is None:
                workspace = torch.empty((step * height * width // length, length), dtype=compute, device=h.device)
            chunk_rows = workspace[: src.shape[0]]
            chunk_rows.copy_(src)
            left_t = factors.left_t(factors.table.t() @ chunk_rows.t())
            if split_right is not None:
                # One low-precision addmm that accumulates in float32 and rounds once, with float32-accurate
                # split operands, reading the input planes directly.
                torch.addmm(src, _split_rows(left_t, h.dtype).t(), split_right, beta=spec.high_gain, out=dst)
                continue
            torch.addmm(chunk_rows, left_t.t(), right, beta=spec.high_gain, out=chunk_rows)
            dst.copy_(chunk_rows)
        if not viewable:
            sample_out.copy_(target.view(sample_out.shape))


def _split_rows(a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[a_hi; a_hi; a_lo] in ``dtype`` with a ~= a_hi + a_lo, to pair (transposed) with [b_hi; b_lo; b_hi].

    (a_hi + a_lo)(b_hi + b_lo) - a_lo b_lo = a_hi b_hi + a_hi b_lo + a_lo b_hi: one low-precision matmul
    with three times the inner size gives the float32 product to ~2^-16 relative.
    """
    hi = a.to(dtype)
    return torch.cat([hi, hi, (a - hi.to(a.dtype)).to(dtype)], dim=0)


def _is_view_compatible(t: torch.Tensor, shape) -> bool:
    """Whether t can be viewed (no copy) with this shape."""
    try:
        t.view(shape)
        return True
    except RuntimeError:
        return False


def filter_skip_fft(h: torch.Tensor, spec: FreeUSpec, s: torch.Tensor) -> torch.Tensor:
    """The filter through a real FFT, for masks with too many frequencies for the low-rank path.

    Re(ifft2(G X)) = ifft2(G_sym X) with G_sym(k) = (G(k) + G(-k)) / 2, and G_sym is Hermitian, so a
    half-spectrum rfft2/irfft2 pair with the symmetrised gains is exact for real h.
    """
    band = spec.band
    compute = torch.float64 if spec.dtype == torch.float64 else torch.float32
    height, width = spec.height, spec.width
    gains = torch.full((height, width), spec.high_gain, dtype=compute, device=h.device)
    ky = (torch.arange(band.ky0, band.ky0 + band.ny, device=h.device)) % height
    kx = (torch.arange(band.kx0, band.kx0 + band.nx, device=h.device)) % width
    inside = _weight_table(band, h.device, torch.bool)
    block = torch.where(inside, s.to(device=h.device, dtype=compute), gains[ky][:, kx])
    gains[ky[:, None], kx[None, :]] = block
    mirror_y = (-torch.arange(height, device=h.device)) % height
    mirror_x = (-torch.arange(width, device=h.device)) % width
    gains = 0.5 * (gains + gains[mirror_y][:, mirror_x])
    spectrum = torch.fft.rfft2(h.to(compute)) * gains[:, : width // 2 + 1]
    return torch.fft.irfft2(spectrum, s=(height, width))


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
