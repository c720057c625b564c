"""The "torch" backend: FreeU at one concat in plain PyTorch, no complex tensors, any device.

Math (docs/design.md section 2, in real arithmetic). Per plane h (H x W), with twiddle tables
``Ey = [cos(2 pi ky y / H) | sin(2 pi ky y / H)]`` (H x 2ny) and ``Ex`` likewise (W x 2nx):

    M  = Ey^T h Ex                      (2ny x 2nx): Scc, Scs / Ssc, Sss for every grid frequency
    R  = Scc - Sss,  I = Ssc + Scs      so that X(k) = R_k - i I_k
    Qr = w * R,      Qi = w * I         w_k = (s - g_hi) [k in K] / (H W)
    h' = g_hi h + Ey [[Qr, Qi], [Qi, -Qr]] Ex^T

because Re(X(k) e^{i(a + b)}) = R (cos a cos b - sin a sin b) + I (sin a cos b + cos a sin b).
The map from M to the coefficient matrix is one fixed small matrix T (see _coefficient_map).

Binding. Everything that depends only on the inputs' shapes, strides, dtype and device (the path, the
tables, the output's strides, every view's shape) is computed once by :func:`bind_torch`, which returns
a runner for every later call with that key; :func:`fused_concat_torch` (the registry's kernel) binds
(memoised) and runs. On the CPU the small tables a call derives from b and s (the backbone's
per-channel scale, the filter's gain-scaled operator) are memoised on the factors' values (a host read
of a 0-d CPU tensor, no synchronisation), so a call with repeated factors issues no op for them.

Paths, by plane (torch_path). Each issues a fixed number of ops whatever the shape and dtype (counted
in tests/test_torch_backend.py; each op is one kernel launch on an accelerator and one parallel region
on the CPU):

- "dense" (small planes, small total work): the whole filter as one (H W x H W) matrix,
  ``Op = g_hi I + (s - g_hi) D`` with ``D = Re(F^-1 diag(m) F)`` (the band's mask m), and one batched
  GEMM of the planes' rows (N, C F, H W) @ Op written straight into the output slice. With s = g_hi,
  Op is exactly g_hi I (so s = g_hi = 1 copies h bit for bit).
- "kronecker" (planes up to 256 elements): the moments and the update are each a single GEMM with the
  table Ey (x) Ex.
- "separable": one thin "moment GEMM" over the data, three small GEMMs on 2nx/W of it, and the rank-2nx
  update as one batched GEMM over the samples that writes the output slice directly.
- "fft": a real FFT pair with the symmetrised gains (masks with too many frequencies).

Low-precision planes are converted once to a float32 copy, computed there and rounded once into the
output: at most two full-size float32 copies of h are alive at a time. Only spec.band is read (never
spec.threshold), so any band, unequal per axis included, is computed as given. The backbone (the first
scaled range; the op writes any further ones) is x times b in float32 (float64 for float64 input),
rounded once, and x exactly elsewhere whatever b holds, inf or NaN included: for float32/float64 on the
CPU one multiply by a per-channel scale, otherwise one op per channel range (_bind_backbone).

Thread count: every reduction is inside a GEMM (or, on the FFT path, an FFT) whose split of the work
over threads does not change the order of any sum, so the output bits do not depend on
torch.set_num_threads on the CPU (tested on 1 and 2 threads, tests/test_torch_backend.py).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import as_strided

from ..spec import FreeUSpec, allocate_output

__all__ = ["fused_concat_torch", "bind_torch", "torch_path", "twiddle_table", "filter_skip_fft"]

_ALLOCATE_OUTPUT = allocate_output

# Every cache here is cleared when it reaches this many entries (like the op's own caches).
_CACHE_LIMIT = 4096
# Values memoised per table for the CPU's factor memo (each entry is one small table, at most H W x H W).
_VALUE_MEMO_LIMIT = 4


def _bounded_store(cache: dict, key, value, limit: int = _CACHE_LIMIT):
    """cache[key] = value, clearing the cache first when it is full; returns value."""
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value
    return value


def _built_once(function: Callable) -> Callable:
    """function(*args) run for a cache: never recording autograd history, never an inference tensor
    (a table built under inference_mode would be refused later by a call that records autograd)."""

    def build(*args):
        with torch.inference_mode(False), torch.no_grad():
            return function(*args)

    return build


def _value_memo(function: Callable, limit: int = _VALUE_MEMO_LIMIT) -> Callable:
    """``function(t)`` for a 0-d CPU tensor t, memoised on t's value (``t.item()``: a host read, no sync).

    A zero's key holds its sign (-0.0 and 0.0 give different bits downstream); a NaN never matches (it
    is recomputed, which is still right). At most ``limit`` entries.
    """
    entries: dict = {}
    build = _built_once(function)

    def memoised(t: torch.Tensor):
        value = t.item()
        key = value if value else (value, math.copysign(1.0, value))
        result = entries.get(key)
        if result is None:
            result = _bounded_store(entries, key, build(t), limit)
        return result

    return memoised


def _factor_function(function: Callable, device: torch.device) -> Callable:
    """The per-call table ``function(factor, ...)``: memoised on the factor's value for CPU inputs (whose
    factors are CPU tensors); on an accelerator computed by device ops every call, which reads nothing on
    the host and stays valid under CUDA graph capture and replay."""
    return _value_memo(function) if device.type == "cpu" else function


class _PlaneTables:
    """Tables of one plane shape and band (built once, read-only afterwards) with one small table per call
    derived from s, ``_per_call(s, high_gain, samples)``."""

    def __init__(self, device: torch.device):
        self.device = device
        self._per_call_functions: dict = {}

    def per_call(self, high_gain: float, samples: int) -> Callable:
        """``table(s)``: the call's table for this g_hi and batch size N, memoised on s on the CPU
        (_factor_function; one function per (g_hi, N), at most 64)."""
        key = (high_gain, samples)
        function = self._per_call_functions.get(key)
        if function is None:
            function = _bounded_store(self._per_call_functions, key, _factor_function(
                lambda s: self._per_call(s, high_gain, samples), self.device), 64)
        return function

    def _per_call(self, s: torch.Tensor, high_gain: float, samples: int) -> torch.Tensor:
        raise NotImplementedError


def _per_plane(cache: dict, build: Callable, spec: FreeUSpec, device: torch.device, dtype: torch.dtype,
               *extra):
    """``build(spec, device, dtype)`` cached in ``cache`` per (plane shape, band, extra key parts, device,
    dtype): built once (_built_once), read-only afterwards."""
    key = (spec.height, spec.width, spec.band) + extra + (device, dtype)
    table = cache.get(key)
    if table is None:
        _refuse_capture(device)
        table = _bounded_store(cache, key, _built_once(build)(spec, device, dtype))
    return table


def _refuse_capture(device: torch.device) -> None:
    """A table is about to be built on ``device``: refused during CUDA graph capture, where its
    host-to-device copies are illegal and its device ops would only be recorded (a cached table would
    then hold garbage for every later eager call)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "the torch backend builds its tables for a plane shape and band on the first call with them; make "
            "that call once before CUDA graph capture (a warm-up call, as torch.compile's CUDA graphs and the "
            "usual capture recipe do), or use the triton or cuda backend")


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
        _refuse_capture(device)
        n = torch.arange(size, dtype=torch.int64)
        k = torch.arange(k0, k0 + count, dtype=torch.int64)
        angle = (torch.remainder(n[:, None] * k[None, :], size).to(torch.float64)) * (2 * math.pi / size)
        table = torch.cat([torch.cos(angle), torch.sin(angle)], dim=1).to(device=device, dtype=dtype)
        _bounded_store(_TWIDDLES, key, table)
    return table


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 planes are filtered in float64, every other dtype in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _view_or_none(t: torch.Tensor, shape) -> Optional[torch.Tensor]:
    """t viewed (no copy) with this shape, or None if its strides allow no such view."""
    try:
        return t.view(shape)
    except RuntimeError:
        return None


def _view_of(like: torch.Tensor) -> Tuple:
    """The as_strided arguments ``(size, stride, offset)`` that make, of a fresh output, the view that
    ``like`` is of the bind-time (meta) output: one op per call where a slice and a view would be two."""
    return tuple(like.shape), like.stride(), like.storage_offset()


def _rows_of(t: torch.Tensor, shape) -> Callable[[torch.Tensor], torch.Tensor]:
    """``rows(t)``: tensors laid out like t as ``shape``, a view where t's strides allow one, else a copy
    (one op either way, decided once per layout)."""
    return (lambda u: u.view(shape)) if _view_or_none(t, shape) is not None else (lambda u: u.reshape(shape))


# ---------------------------------------------------------------------------------------------------
# Backbone


def _bind_backbone(spec: FreeUSpec, x: torch.Tensor, out_x: torch.Tensor) -> Callable:
    """``write(out, x, b, scale_map)``: out_x = x with channels [start, stop) scaled by b (v1) or by the
    v2 map ``(b - 1) m^ + 1`` (scale_map, (N, [F,] H, W)), exactly x elsewhere; the product in the
    float32 (float64) of the factor, rounded once into the output.

    float32/float64 x on the CPU, v1: one multiply by a per-channel scale ``where(channel in window, b,
    1)`` (memoised on b; x * 1 is x exactly, whatever b is). Otherwise one op per channel range: a copy
    of each unscaled range and a multiply of the window by the 0-d b (read at float32 precision, as a
    host scalar would be; a CPU b with a device x is a kernel argument, which ``where`` does not take on
    every version). A low-precision x times a float32 vector would go through TensorIterator's
    per-element casts: 11x slower than the copy and the multiply at (2, 1280, 16, 16) bf16 (Intel
    Sapphire Rapids, AVX-512, 1 thread).
    """
    start, stop = spec.window
    view = _view_of(out_x)
    if stop <= start:
        return lambda out, x, b, scale_map: as_strided(out, *view).copy_(x)
    cx = spec.backbone_channels_total
    ranges = [(first, last, _view_of(out_x[:, first:last]), first == start)
              for first, last in ((0, start), (start, stop), (stop, cx)) if last > first]

    def write_ranges(out, x, factor):
        for first, last, range_view, scaled in ranges:
            if scaled:
                torch.mul(x[:, first:last], factor, out=as_strided(out, *range_view))
            else:
                as_strided(out, *range_view).copy_(x[:, first:last])

    if x.device.type != "cpu" or x.dtype != _compute_dtype(x.dtype):
        return lambda out, x, b, scale_map: write_ranges(
            out, x, b if scale_map is None else scale_map.unsqueeze(1))
    channel = torch.arange(cx, device=x.device).view((cx,) + (1,) * (x.dim() - 2))
    in_window = (channel >= start) & (channel < stop)
    dtype = x.dtype  # float32 or float64 here: the factor's compute dtype, whatever b's dtype
    scale_of = _value_memo(lambda b: torch.where(in_window, b.to(dtype), 1.0))

    def write(out, x, b, scale_map):
        if scale_map is None:
            torch.mul(x, scale_of(b), out=as_strided(out, *view))
        else:
            write_ranges(out, x, scale_map.unsqueeze(1))

    return write


# ---------------------------------------------------------------------------------------------------
# Filter tables

# Planes up to this many elements use one Kronecker table (H W x 4 ny nx) instead of the separable pair:
# a single GEMM over all planes beats thin products over plane rows of a few elements (SD 1.5's 8x8 and
# 16x16 planes; measured on a 2-vCPU EPYC).
_KRONECKER_MAX_PLANE = 256

# The dense path's size rule, from one run of the dense path against the path it replaces (Kronecker,
# separable or FFT) at one thread, Intel Sapphire Rapids, AVX-512, medians of 7 interleaved rounds; time
# of dense / time of the other path (shape (N, C), r = 4 ny nx the low-rank rank; work = N C (H W)^2):
#   t=1 (r=16), 8x8:  (1,4) 0.60, (2,64) 0.80 [bf16 0.87], (2,320) 1.03, (2,1280) 1.12 [bf16 0.92]
#   t=1, 16x16:       (1,4) 0.78, (1,16) 1.08, (2,64) 2.62 [bf16 1.94], (2,320) 2.82, (2,640) 2.64
#   t=1, 12x20:       (1,16) 1.03, (2,256) 3.12
#   t=2 (r=64), 16x16: (2,64) 1.43, (2,320) 1.58;  t=3 (r=144): 16x16 (2,64) 0.83, (2,320) 0.88; 8x8 (2,1280) 0.29
#   FFT band, 20x12:  (1,8) 0.75, (2,256) 1.77
# The dense GEMM costs H W multiply-adds per element, the low-rank pair about 2r: dense wins at any size
# where H W <= 2r, and wherever the GEMM is small enough (work <= 2^19, a few microseconds at one thread)
# that the count of ops decides. (On an accelerator, where each op is a launch, the fewer ops may argue
# for more; not measured here.)
_DENSE_MAX_PLANE = 256
_DENSE_SMALL_WORK = 1 << 19


def torch_path(spec: FreeUSpec) -> str:
    """The computation this backend runs for the skip features of a spec: "none" (no element), "scale"
    (empty band: g_hi h), "dense", "kronecker", "separable" or "fft" (module docstring)."""
    planes, area = spec.batch * spec.skip_channels * spec.frames, spec.plane_size
    if planes * area == 0:
        return "none"
    if spec.band.empty:
        return "scale"
    if area <= _DENSE_MAX_PLANE:
        if planes * area * area <= _DENSE_SMALL_WORK:
            return "dense"
        if not spec.uses_fft_fallback and area <= 8 * spec.band.ny * spec.band.nx:
            return "dense"
    if spec.uses_fft_fallback:
        return "fft"
    return "kronecker" if area <= _KRONECKER_MAX_PLANE else "separable"


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


class _LowRankFactors(_PlaneTables):
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
    call (``per_call``, memoised on s on the CPU), so a changing s costs no rebuild.
    """

    def __init__(self, spec: FreeUSpec, device: torch.device, compute: torch.dtype):
        super().__init__(device)
        band = spec.band
        self.height = spec.height
        ey = twiddle_table(spec.height, band.ky0, band.ny, device, compute)
        ex = twiddle_table(spec.width, band.kx0, band.nx, device, compute)
        coefficient_map = _coefficient_map(band)
        self.kronecker = spec.plane_size <= _KRONECKER_MAX_PLANE
        self.compute = compute
        if self.kronecker:
            # (H W, 2ny * 2nx): column (a, b) holds Ey[y, a] Ex[x, b].
            self.table = (ey[:, None, :, None] * ex[None, :, None, :]).reshape(spec.plane_size, -1)
            self.gained = coefficient_map.to(device=device, dtype=compute) @ self.table.t()  # T K^T
            self.row_length = spec.plane_size
        else:
            self.ey = ey
            self.table = ex
            self.gained = coefficient_map.to(device=device, dtype=compute)  # T
            self.unit_right = ex.t().contiguous()
            self.row_length = spec.width
        self.plane_size = spec.plane_size

    def _per_call(self, s: torch.Tensor, high_gain: float, samples: int) -> torch.Tensor:
        """The call's gain ``(s - g_hi) / (H W)`` times the gained table: T K^T expanded over the samples
        (a view: the update's right factor), or T."""
        scaled = self.gained * ((s.to(self.compute) - high_gain) / self.plane_size)
        return scaled.expand(samples, -1, -1) if self.kronecker else scaled


_FACTORS: Dict[Tuple, _LowRankFactors] = {}


def _low_rank_factors(spec: FreeUSpec, device: torch.device, compute: torch.dtype) -> _LowRankFactors:
    """The cached _LowRankFactors of a plane shape and band (built once, read-only afterwards)."""
    return _per_plane(_FACTORS, _LowRankFactors, spec, device, compute)


_FFT_GAINS: Dict[Tuple, torch.Tensor] = {}


def _fft_mask(spec: FreeUSpec, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(H, W // 2 + 1) half-spectrum weights m_sym(k) = (m(k) + m(-k)) / 2, m the 0/1 mask of the band.

    Cached per plane shape, band, device and dtype; the call's gains are g_hi + (s - g_hi) m_sym.
    """
    return _per_plane(_FFT_GAINS, _build_fft_mask, spec, device, dtype)


def _build_fft_mask(spec: FreeUSpec, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """_fft_mask's table: the band's weights scattered onto the plane's frequencies, symmetrised."""
    band, height, width = spec.band, spec.height, spec.width
    mask = torch.zeros(height, width, dtype=torch.float64)
    ky = torch.arange(band.ky0, band.ky0 + band.ny) % height
    kx = torch.arange(band.kx0, band.kx0 + band.nx) % width
    mask[ky[:, None], kx[None, :]] = band.weight_table(torch.float64)
    mirror_y, mirror_x = (-torch.arange(height)) % height, (-torch.arange(width)) % width
    table = 0.5 * (mask + mask[mirror_y][:, mirror_x])
    return table[:, : width // 2 + 1].to(device=device, dtype=dtype)


def _fft_gains(spec: FreeUSpec, s: torch.Tensor, device: torch.device, compute: torch.dtype) -> torch.Tensor:
    """The half-spectrum gains G_sym = g_hi + (s - g_hi) m_sym of a call (see filter_skip_fft)."""
    gains = _fft_mask(spec, device, compute) * (s.to(device=device, dtype=compute) - spec.high_gain)
    gains += spec.high_gain
    return gains


_FFT_GAIN_MEMOS: Dict[Tuple, Callable] = {}


def _fft_gains_of(spec: FreeUSpec, device: torch.device, compute: torch.dtype) -> Callable:
    """``gains(s)``: _fft_gains of this plane shape, band and g_hi, memoised on s on the CPU."""
    return _per_plane(_FFT_GAIN_MEMOS, lambda spec, device, compute: _factor_function(
        lambda s: _fft_gains(spec, s, device, compute), device), spec, device, compute, spec.high_gain)


def filter_skip_fft(h: torch.Tensor, spec: FreeUSpec, s: torch.Tensor, gains: Optional[torch.Tensor] = None
                    ) -> torch.Tensor:
    """The filter through a real FFT, for masks with too many frequencies for the low-rank path.

    Re(ifft2(G X)) = ifft2(G_sym X) with G_sym(k) = (G(k) + G(-k)) / 2, and G_sym is Hermitian, so a
    half-spectrum rfft2/irfft2 pair with the symmetrised gains is exact for real h. With G = g_hi +
    (s - g_hi) m: G_sym = g_hi + (s - g_hi) m_sym (_fft_mask). ``gains``: the call's G_sym if already
    formed (_fft_gains). Returns the filtered planes in the compute dtype (float32, or float64 for
    float64 input).
    """
    compute = _compute_dtype(spec.dtype)
    if gains is None:
        gains = _fft_gains(spec, s, h.device, compute)
    spectrum = torch.fft.rfft2(h.to(compute))
    spectrum *= gains
    return torch.fft.irfft2(spectrum, s=(spec.height, spec.width))


class _DenseFilter(_PlaneTables):
    """The filter of one plane shape and band as one (H W, H W) matrix on plane rows (the dense path).

    ``D = Re(F^-1 diag(m) F)`` (row q: the low-pass response to the impulse at pixel q), so that
    ``h' = g_hi h + (s - g_hi) h D = h Op``: the FFT path's definition (_fft_mask) applied to the
    identity in float64, rounded once. Built once per (plane shape, band, device, dtype); the call's
    operator (``per_call``, memoised on s on the CPU) is a multiply and an add on it.
    """

    def __init__(self, spec: FreeUSpec, device: torch.device, compute: torch.dtype):
        super().__init__(device)
        area = self.area = spec.plane_size
        impulses = torch.eye(area, dtype=torch.float64).view(area, spec.height, spec.width)
        spectrum = torch.fft.rfft2(impulses) * _fft_mask(spec, torch.device("cpu"), torch.float64)
        low_pass = torch.fft.irfft2(spectrum, s=(spec.height, spec.width)).reshape(area, area)
        self.low_pass = low_pass.to(device=device, dtype=compute)
        self.identity = torch.eye(area, device=device, dtype=compute)

    def _per_call(self, s: torch.Tensor, high_gain: float, samples: int) -> torch.Tensor:
        """``Op = g_hi I + (s - g_hi) D`` expanded over the samples (a view); exactly g_hi I when s = g_hi
        (D * 0 is zero). Binary ops only: a CPU s with a device table is a kernel argument there."""
        identity = self.identity if high_gain == 1.0 else self.identity * high_gain
        gain = s.to(self.low_pass.dtype) - high_gain  # in the compute dtype, whatever s's dtype
        return (identity + self.low_pass * gain).expand(samples, self.area, self.area)


_DENSE: Dict[Tuple, _DenseFilter] = {}


def _dense_filter(spec: FreeUSpec, device: torch.device, compute: torch.dtype) -> _DenseFilter:
    """The cached _DenseFilter of a plane shape and band (built once, read-only afterwards)."""
    return _per_plane(_DENSE, _DenseFilter, spec, device, compute)


# ---------------------------------------------------------------------------------------------------
# Skip features: one bound writer per path, ``filter(out, h, s)``


def _bind_scale(spec, h, out_h, compute):
    """Empty band: out_h = g_hi h."""
    view = _view_of(out_h)
    high_gain = spec.high_gain
    return lambda out, h, s: torch.mul(h, high_gain, out=as_strided(out, *view))


def _bind_fft(spec, h, out_h, compute):
    """The FFT path: the filtered planes in the compute dtype, copied (rounded once) into out_h."""
    view = _view_of(out_h)
    _fft_mask(spec, h.device, compute)  # built here, never inside a call (which may be a graph capture)
    gains_of = _fft_gains_of(spec, h.device, compute)

    def run(out, h, s):
        as_strided(out, *view).copy_(filter_skip_fft(h, spec, s, gains_of(s)))

    return run


def _bind_dense(spec, h, out_h, compute):
    """The dense path: rows (N, C F, H W) @ Op, ``Op = g_hi I + (s - g_hi) D`` (exactly g_hi I when
    s = g_hi), expanded over the N samples (a view) for one batched GEMM written straight into the
    output slice. A low-precision h goes through one float32 copy and one float32 product, rounded once
    into the output; so does an output slice without the rows view (5-D channels_last_3d)."""
    area, samples, high_gain = spec.plane_size, h.shape[0], spec.high_gain
    shape = (samples, h.numel() // (samples * area), area)
    rows_of = _rows_of(h, shape)
    operator = _dense_filter(spec, h.device, compute).per_call(high_gain, samples)
    target = _view_or_none(out_h, shape)
    if target is not None and h.dtype == compute:
        view = _view_of(target)
        return lambda out, h, s: torch.bmm(rows_of(h), operator(s), out=as_strided(out, *view))
    view = _view_of(out_h)
    logical = tuple(out_h.shape)

    def run(out, h, s):
        # The float32 copy of a low-precision h is an argument only: released once the product exists.
        product = torch.bmm(rows_of(h).to(compute), operator(s))
        as_strided(out, *view).copy_(product.view(logical))

    return run


def _bind_low_rank(spec, h, out_h, compute):
    """The low-rank path: out_h = g_hi h + left @ right for every plane, in a fixed number of ops.

    All planes at once: h as rows (R, row_length) in logical order (one copy if its layout has no such
    view, e.g. channels_last), converted once to the float32 compute dtype if it is of lower precision;
    the factors from _LowRankFactors; then one batched GEMM over the N samples, ``left @ right``, and one
    add of ``g_hi h``. A float32/float64 output slice whose layout has the rows view (each sample's
    planes are one contiguous block of the output even though the output interleaves the backbone
    channels) is written by the GEMM directly; otherwise the product goes to one temporary and the add
    writes the output (the single rounding of a low-precision output). At most two full-size float32
    temporaries are alive at a time.
    """
    factors = _low_rank_factors(spec, h.device, compute)
    length = factors.row_length
    samples = h.shape[0]
    flat_rows = _rows_of(h, (-1, length))
    rows_shape = (samples, h.numel() // (samples * length), length)
    high_gain = spec.high_gain
    if factors.kronecker:
        table, scaled = factors.table, factors.per_call(high_gain, samples)

        def left_and_right(flat, s):
            return flat @ table, scaled(s)  # the moment GEMM: (R, r)
    else:
        planes = h.numel() // (spec.height * spec.width)
        height, two_nx = spec.height, 2 * spec.band.nx
        ey_t = factors.ey.t().expand(planes, -1, -1)  # (P, 2ny, H)
        ey = factors.ey.expand(planes, -1, -1)  # (P, H, 2ny)
        right = factors.unit_right.expand(samples, -1, -1)
        table, scaled = factors.table, factors.per_call(high_gain, 1)

        def left_and_right(flat, s):
            # Every product keeps the long axis (the rows) as the GEMM's M dimension, which the BLAS
            # splits over threads; its K dimension (W, H or H W) is never split, so no sum's order
            # depends on the thread count. (The transposed, "wide" moment GEMM ``table^T rows^T`` is
            # faster on MKL but its result changes in the last bit with the thread count.)
            products = (flat @ table).view(planes, height, two_nx)  # the moment GEMM
            moments = torch.bmm(ey_t, products)  # (P, 2ny, 2nx)
            coefficients = moments.view(planes, -1) @ scaled(s)  # (P, (a, b)) row-major
            left = torch.bmm(ey, coefficients.view(planes, -1, two_nx))  # (P, H, 2nx): Ey Q_p
            return left, right

    target = _view_or_none(out_h, rows_shape) if h.dtype == compute else None
    if target is not None:
        view = _view_of(target)

        def run(out, h, s):
            # The update as a plain batched GEMM and one elementwise add, out = left @ right + g_hi h:
            # MKL's GEMM with a beta term (baddbmm, beta = g_hi) rounds differently with the thread
            # count, without it not.
            flat = flat_rows(h)
            left, right = left_and_right(flat, s)
            written = torch.bmm(left.view(samples, -1, left.shape[-1]), right, out=as_strided(out, *view))
            written.add_(flat.view(rows_shape), alpha=high_gain)

        return run
    view = _view_of(out_h)
    logical = tuple(h.shape)

    def run(out, h, s):
        # Any other layout or dtype: the product in a compute-dtype temporary (the float32 copy of a
        # low-precision h is released first), added to h itself, in place, then one cast into the output:
        # an out= add of mixed dtypes would widen h and the sum into two more float32 temporaries first.
        left, right = left_and_right(flat_rows(h).to(compute), s)
        product = torch.bmm(left.view(samples, -1, left.shape[-1]), right).view(logical)
        del left
        product.add_(h, alpha=high_gain)
        as_strided(out, *view).copy_(product)

    return run


_SKIP_BINDERS = {"scale": _bind_scale, "fft": _bind_fft, "dense": _bind_dense, "kronecker": _bind_low_rank,
                 "separable": _bind_low_rank}


# ---------------------------------------------------------------------------------------------------
# The runner


def bind_torch(spec: FreeUSpec, x: torch.Tensor, h: torch.Tensor) -> Callable:
    """The runner ``run(x, h, b, s, scale_map) -> out`` of every call whose x and h have these shapes,
    strides, dtype and device (and this spec): the path, its tables, the output's strides and every view
    are fixed here, once.

    ``b`` and ``s`` are 0-d tensors (float32, or float64 for float64 inputs) on the CPU or on x's device;
    ``scale_map`` is the v2 structure map (None for version 1). The runner allocates the output in
    allocate_output's layout and writes every element of it.
    """
    cx, skip = spec.backbone_channels_total, spec.skip_channels
    path = torch_path(spec)
    # The runner outlives this call: none of what it holds may be an inference tensor.
    with torch.inference_mode(False):
        # The output's layout, from a meta tensor laid out like x (what allocate_output makes of it).
        out_like = allocate_output(torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta"), skip)
        write_backbone = _bind_backbone(spec, x, out_like[:, :cx])
        filter_skip = None
        if path != "none":
            filter_skip = _SKIP_BINDERS[path](spec, h, out_like[:, cx:], _compute_dtype(spec.dtype))
    size, stride, dtype, device = tuple(out_like.shape), out_like.stride(), x.dtype, x.device

    def run(x, h, b, s, scale_map=None):
        # allocate_output's layout, precomputed (one op, without its per-call layout checks); a replaced
        # allocate_output (the tests' NaN-poisoned buffers, tests/conftest.py) is called instead.
        if allocate_output is _ALLOCATE_OUTPUT:
            out = torch.empty_strided(size, stride, dtype=dtype, device=device)
        else:
            out = allocate_output(x, skip)
        write_backbone(out, x, b, scale_map)
        if filter_skip is not None:
            filter_skip(out, h, s)
        return out

    return run


_RUNNERS: Dict[Tuple, Callable] = {}


def fused_concat_torch(
    x: torch.Tensor, h: torch.Tensor, b: torch.Tensor, s: torch.Tensor, spec: FreeUSpec, scale_map=None
) -> torch.Tensor:
    """FreeU at one concat in PyTorch ops, writing straight into the slices of one output tensor: the
    runner of bind_torch, memoised per (spec, shapes, strides, dtype, device).

    ``b`` and ``s`` are 0-d tensors (float32, or float64 for float64 inputs); ``scale_map`` is the v2
    structure map (None for version 1).
    """
    key = (spec, x.shape, x.stride(), h.shape, h.stride(), x.device)
    run = _RUNNERS.get(key)
    if run is None:
        run = _bounded_store(_RUNNERS, key, bind_torch(spec, x, h))
    return run(x, h, b, s, scale_map)
