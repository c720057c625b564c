"""The input spec shared by every backend: argument checks, the output layout and the frequency table.

Nothing here launches a kernel. Every backend (torch, triton, cuda) and the op registration read the
same :class:`FreeUSpec`, so an input is validated once and described once.

The filter is a low-rank correction (DESIGN.md section 2). Written per (n, c[, f]) plane of size H x W:

    h'[y, x] = g_hi * h[y, x] + (1 / (H W)) Re sum_{k in K} (g_k - g_hi) X(k) e^{+2 pi i (ky y / H + kx x / W)}

For both masks the set K lies inside a product grid of contiguous frequency ranges
``[ky0, ky0 + ny) x [kx0, kx0 + nx)`` (:class:`FrequencyBand`); the "box" mask fills the whole grid and
the "radial" mask keeps the grid points with ``ky^2 + kx^2 < t^2``. A kernel therefore needs only four
integers and the mask kind to rebuild K, no frequency tensor.
"""

from __future__ import annotations

import enum
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

__all__ = [
    "Backend",
    "Mask",
    "FrequencyBand",
    "FreeUSpec",
    "SUPPORTED_DTYPES",
    "KERNEL_DTYPES",
    "MAX_LOWRANK_FREQUENCIES_PER_AXIS",
    "make_spec",
    "allocate_output",
    "output_memory_format",
    "check_factor",
]


class Backend(str, enum.Enum):
    """Which implementation computes the op. ``AUTO`` picks the best available for the tensors' device."""

    AUTO = "auto"
    TORCH = "torch"
    CPU = "cpu"
    TRITON = "triton"
    CUDA = "cuda"


class Mask(str, enum.Enum):
    """Shape of the low-frequency region that gets gain ``s``.

    ``BOX``: the official code's square slice ``[c - t : c + t]`` around the fftshift centre (Python slice
    semantics, so it is asymmetric and clamps exactly as the reference's slices clamp).
    ``RADIAL``: the paper's formula, ``sqrt(dy^2 + dx^2) < t`` with dy, dx measured from the centre.
    """

    BOX = "box"
    RADIAL = "radial"


# float64 is accepted everywhere (gradcheck, oracles); the GPU kernels compute in float32 and accept the
# three dtypes diffusion U-Nets run in.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Past this many frequencies on one axis the fused kernels stop paying (their per-element work grows
# linearly with the count, an FFT's does not): the op then takes the FFT path. 16 per axis is a box or
# radial threshold of 8. See bench/README.md for how the crossover is measured.
MAX_LOWRANK_FREQUENCIES_PER_AXIS = 16


@dataclass(frozen=True)
class FrequencyBand:
    """The masked frequencies of one plane as a product grid of two contiguous signed ranges.

    ``ky0 .. ky0 + ny - 1`` on the H axis and ``kx0 .. kx0 + nx - 1`` on the W axis (signed frequencies,
    i.e. fftshift index minus ``size // 2``). ``radius_sq`` is ``t * t`` for the radial mask (a grid
    point is masked when ``ky^2 + kx^2 < radius_sq``) and ``None`` for the box, which masks every point.
    """

    ky0: int
    ny: int
    kx0: int
    nx: int
    radius_sq: Optional[int]

    @property
    def empty(self) -> bool:
        return self.ny == 0 or self.nx == 0

    @property
    def radial(self) -> bool:
        return self.radius_sq is not None

    def weight_table(self, dtype=torch.float64) -> torch.Tensor:
        """(ny, nx) table: 1 where the grid point belongs to the mask, 0 where it does not."""
        ky = torch.arange(self.ky0, self.ky0 + self.ny, dtype=torch.int64)
        kx = torch.arange(self.kx0, self.kx0 + self.nx, dtype=torch.int64)
        if self.radius_sq is None:
            return torch.ones(self.ny, self.nx, dtype=dtype)
        return ((ky[:, None] ** 2 + kx[None, :] ** 2) < self.radius_sq).to(dtype)


def _box_range(size: int, threshold: int) -> Tuple[int, int]:
    """Signed start and count of the reference slice ``[size//2 - t : size//2 + t]`` on one axis.

    ``range(size)[a:b]`` applies exactly the clamping and negative-index wrap of tensor slicing, so a
    threshold past the plane size behaves as the reference's slice does.
    """
    rows = range(size)[size // 2 - threshold : size // 2 + threshold]
    return (rows.start - size // 2, len(rows)) if len(rows) else (0, 0)


def _radial_range(size: int, threshold: int) -> Tuple[int, int]:
    """Signed start and count of the offsets d with |d| < t that exist on an axis of this size."""
    if threshold <= 0:
        return 0, 0
    lo = max(-(threshold - 1), -(size // 2))
    hi = min(threshold - 1, size - 1 - size // 2)
    return lo, max(0, hi - lo + 1)


def frequency_band(height: int, width: int, threshold: int, mask: Mask) -> FrequencyBand:
    """The masked frequency grid of an H x W plane for this threshold and mask kind."""
    if mask is Mask.BOX:
        ky0, ny = _box_range(height, threshold)
        kx0, nx = _box_range(width, threshold)
        return FrequencyBand(ky0, ny, kx0, nx, None)
    ky0, ny = _radial_range(height, threshold)
    kx0, nx = _radial_range(width, threshold)
    return FrequencyBand(ky0, ny, kx0, nx, threshold * threshold)


@dataclass(frozen=True)
class FreeUSpec:
    """Everything a backend needs to know about one call, validated.

    Shapes are logical (N, C, F, H, W); 4-D inputs have ``frames == 1``.
    """

    batch: int
    backbone_channels_total: int  # Cx
    skip_channels: int  # Ch
    frames: int
    height: int
    width: int
    ndim: int
    dtype: torch.dtype
    threshold: int
    version: int
    window: Tuple[int, int]  # scaled backbone channels [start, stop)
    high_gain: float
    mask: Mask
    band: FrequencyBand

    @property
    def out_channels(self) -> int:
        return self.backbone_channels_total + self.skip_channels

    @property
    def plane_size(self) -> int:
        return self.height * self.width

    @property
    def uses_fft_fallback(self) -> bool:
        """True when K is too large for the low-rank kernels (see MAX_LOWRANK_FREQUENCIES_PER_AXIS)."""
        return max(self.band.ny, self.band.nx) > MAX_LOWRANK_FREQUENCIES_PER_AXIS


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in (4, 5):
        raise ValueError(
            f"{name} must be 4-D (N, C, H, W) or 5-D (N, C, F, H, W), got shape {tuple(t.shape)}"
        )
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype among float16, bfloat16, float32, float64, got {t.dtype}"
        )


def _check_int(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_factor(name: str, value, device: torch.device) -> None:
    """b and s: a Python real number or a 0-d real tensor on the CPU or on the inputs' device."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name} must be a Python float or a 0-d tensor, got shape {tuple(value.shape)}")
        if not value.dtype.is_floating_point and value.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be a real number tensor, got dtype {value.dtype}")
        if value.device.type != "cpu" and value.device != device:
            raise ValueError(f"{name} must be on the CPU or on the inputs' device {device}, got {value.device}")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python float or a 0-d tensor, got {type(value).__name__}")


def make_spec(
    x: torch.Tensor,
    h: torch.Tensor,
    threshold: int = 1,
    version: int = 1,
    backbone_channels: Optional[Sequence[int]] = None,
    high_gain: float = 1.0,
    mask: str = "box",
) -> FreeUSpec:
    """Validate one call's arguments and describe it. Raises TypeError/ValueError naming the argument."""
    _check_tensor("x", x)
    _check_tensor("h", h)
    if h.dim() != x.dim():
        raise ValueError(f"h must have the same rank as x ({x.dim()}-D), got shape {tuple(h.shape)}")
    if h.shape[0] != x.shape[0]:
        raise ValueError(f"h must have the same batch size N as x ({x.shape[0]}), got {h.shape[0]}")
    if h.shape[2:] != x.shape[2:]:
        raise ValueError(
            f"h must have the same trailing dims as x {tuple(x.shape[2:])}, got {tuple(h.shape[2:])}"
        )
    if h.dtype != x.dtype:
        raise TypeError(f"h must have the same dtype as x ({x.dtype}), got {h.dtype}")
    if h.device != x.device:
        raise ValueError(f"h must be on the same device as x ({x.device}), got {h.device}")
    threshold = _check_int("threshold", threshold)
    if isinstance(version, bool) or version not in (1, 2):
        raise ValueError(f"version must be 1 or 2, got {version!r}")
    cx = x.shape[1]
    if backbone_channels is None:
        window = (0, cx // 2)
    else:
        if isinstance(backbone_channels, (str, bytes)) or len(backbone_channels) != 2:
            raise ValueError(f"backbone_channels must be a (start, stop) pair, got {backbone_channels!r}")
        start = _check_int("backbone_channels[0]", backbone_channels[0])
        stop = _check_int("backbone_channels[1]", backbone_channels[1])
        if not start <= stop <= cx:
            raise ValueError(
                f"backbone_channels must satisfy 0 <= start <= stop <= Cx={cx}, got ({start}, {stop})"
            )
        window = (start, stop)
    if isinstance(high_gain, bool) or not isinstance(high_gain, numbers.Real):
        raise TypeError(f"high_gain must be a Python float, got {type(high_gain).__name__}")
    try:
        mask_kind = Mask(mask)
    except ValueError:
        raise ValueError(f"mask must be one of {[m.value for m in Mask]}, got {mask!r}") from None
    height, width = x.shape[-2], x.shape[-1]
    return FreeUSpec(
        batch=x.shape[0],
        backbone_channels_total=cx,
        skip_channels=h.shape[1],
        frames=x.shape[2] if x.dim() == 5 else 1,
        height=height,
        width=width,
        ndim=x.dim(),
        dtype=x.dtype,
        threshold=threshold,
        version=int(version),
        window=window,
        high_gain=float(high_gain),
        mask=mask_kind,
        band=frequency_band(height, width, threshold, mask_kind),
    )


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The output follows x: channels_last(_3d) when x is in that format (and not plainly contiguous)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def allocate_output(x: torch.Tensor, skip_channels: int) -> torch.Tensor:
    """Uninitialised output of shape (N, Cx + Ch, ...) in x's dtype, device and memory format."""
    shape = (x.shape[0], x.shape[1] + skip_channels) + tuple(x.shape[2:])
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))
