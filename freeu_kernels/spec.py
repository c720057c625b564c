"""The input spec shared by every backend: argument checks, the output layout and the frequency table.

Nothing here launches a kernel. Every backend (torch, triton, cuda) and the op registration read the
same :class:`FreeUSpec`, so an input is validated once and described once.

The filter is a low-rank correction (docs/design.md section 2). Written per (n, c[, f]) plane of size H x W:

    h'[y, x] = g_hi * h[y, x] + (1 / (H W)) Re sum_{k in K} (g_k - g_hi) X(k) e^{+2 pi i (ky y / H + kx x / W)}

For both masks the set K lies inside a product grid of contiguous frequency ranges
``[ky0, ky0 + ny) x [kx0, kx0 + nx)`` (:class:`FrequencyBand`); the "box" mask fills the whole grid and
the "radial" mask keeps the grid points with ``ky^2 + kx^2 < t^2``. A kernel therefore needs only four
integers and the mask kind to rebuild K, no frequency tensor.
"""

from __future__ import annotations

import collections.abc
import enum
import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

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
    "check_tensors",
    "check_options",
    "CallOptions",
    "has_symbolic_sizes",
    "SIZE_FREE_THRESHOLD_CAP",
    "cached_spec",
    "clamp_threshold",
    "parse_threshold",
    "parse_backbone_channels",
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


ThresholdArg = Union[int, Tuple[int, int]]


def parse_threshold(threshold, mask: "Mask") -> Tuple[int, int]:
    """``threshold`` as the pair (t_rows, t_cols): an int t means (t, t); the radial mask takes one radius.

    Raises TypeError/ValueError naming ``threshold``. The values are not clamped here (see clamp_threshold).
    """
    if isinstance(threshold, collections.abc.Sequence) and not isinstance(threshold, (str, bytes)):
        if len(threshold) != 2:
            raise ValueError(f"threshold must be an int or a (t_rows, t_cols) pair, got {threshold!r}")
        pair = (_check_int("threshold[0]", threshold[0]), _check_int("threshold[1]", threshold[1]))
        if mask is Mask.RADIAL and pair[0] != pair[1]:
            raise ValueError(f"threshold: the radial mask takes one radius (an int or an equal pair), got {pair}")
        return pair
    value = _check_int("threshold", threshold)
    return value, value


def clamp_threshold(height: int, width: int, threshold, mask: "Mask") -> Tuple[int, int]:
    """The (t_rows, t_cols) that select exactly what ``threshold`` selects on an H x W plane, small enough
    that no product of them overflows int64 (the one place every backend and the reference take it from).

    Box, per axis of size n: the slice ``[n//2 - t : n//2 + t]`` is the same for every t >= n//2 + n
    (its start is then <= -n, which clamps to 0, and its stop is >= n), so t is capped there; below that
    cap it keeps Python's wrap of a start in [-n, 0) exactly as the reference's slice does.
    Radial: every offset satisfies dy^2 + dx^2 <= (H//2)^2 + (W//2)^2 < (H//2 + W//2 + 1)^2, so a radius
    past H//2 + W//2 + 1 (the plane's diagonal) selects every frequency, like that cap does; the cap
    keeps t^2 below 2^63 for any plane torch can allocate.
    """
    t_rows, t_cols = parse_threshold(threshold, mask)
    if mask is Mask.BOX:
        return min(t_rows, height // 2 + height), min(t_cols, width // 2 + width)
    radius = min(t_rows, height // 2 + width // 2 + 1)
    return radius, radius


def frequency_band(height: int, width: int, threshold, mask: "Mask") -> FrequencyBand:
    """The masked frequency grid of an H x W plane for this threshold (int or pair) and mask kind."""
    t_rows, t_cols = clamp_threshold(height, width, threshold, mask)
    if mask is Mask.BOX:
        ky0, ny = _box_range(height, t_rows)
        kx0, nx = _box_range(width, t_cols)
        return FrequencyBand(ky0, ny, kx0, nx, None)
    ky0, ny = _radial_range(height, t_rows)
    kx0, nx = _radial_range(width, t_cols)
    return FrequencyBand(ky0, ny, kx0, nx, t_rows * t_rows)


def _check_range(name: str, pair, channels: int) -> Tuple[int, int]:
    if not isinstance(pair, collections.abc.Sequence) or isinstance(pair, (str, bytes)) or len(pair) != 2:
        raise ValueError(f"{name} must be a (start, stop) pair, got {pair!r}")
    start = _check_int(f"{name}[0]", pair[0])
    stop = _check_int(f"{name}[1]", pair[1])
    if not start <= stop <= channels:
        raise ValueError(f"{name} must satisfy 0 <= start <= stop <= Cx={channels}, got ({start}, {stop})")
    return start, stop


def parse_backbone_channels(backbone_channels, channels: int) -> Tuple[Tuple[int, int], ...]:
    """The scaled channel ranges of x, validated, sorted and merged (overlapping or adjacent ranges join).

    Accepts None (the default ``(0, Cx // 2)``), one ``(start, stop)`` pair, a sequence of pairs (a
    wrapped region is two ranges; an empty sequence scales nothing), or the op schema's flat list of 2k
    ints (k pairs). Empty ranges are dropped, so the result may be empty (nothing scaled).
    """
    if backbone_channels is None:
        # No sort or merge: Cx may be symbolic (dynamic shapes), and one range needs neither.
        half = channels // 2
        return ((0, half),) if half > 0 else ()
    if not isinstance(backbone_channels, collections.abc.Sequence) or isinstance(backbone_channels, (str, bytes)):
        raise TypeError("backbone_channels must be a (start, stop) pair or a sequence of such pairs (a list or "
                        f"tuple), got {type(backbone_channels).__name__}")
    elif len(backbone_channels) and all(isinstance(v, numbers.Integral) for v in backbone_channels):
        if len(backbone_channels) % 2:
            raise ValueError(f"backbone_channels must be a (start, stop) pair, got {backbone_channels!r}")
        flat = list(backbone_channels)
        name = "backbone_channels" if len(flat) == 2 else "backbone_channels (flat pairs)"
        pairs = [_check_range(name, flat[i : i + 2], channels) for i in range(0, len(flat), 2)]
    else:
        pairs = [_check_range(f"backbone_channels[{i}]", pair, channels) for i, pair in enumerate(backbone_channels)]
    # Ordered by start (ranges with one start merge whatever their order) by insertion, not sorted():
    # under torch.compile(dynamic=True) the ints may be symbolic, which Dynamo compares (with a guard)
    # but does not sort.
    ordered = []
    for pair in pairs:
        if pair[1] > pair[0]:
            index = len(ordered)
            while index and ordered[index - 1][0] > pair[0]:
                index -= 1
            ordered.insert(index, pair)
    merged = []
    for start, stop in ordered:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return tuple(merged)


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
    threshold: Tuple[int, int]  # (t_rows, t_cols), clamped to the plane (clamp_threshold)
    version: int
    window: Tuple[int, int]  # the first scaled range [start, stop), the one the kernels apply; (0, 0) if none
    high_gain: float
    mask: Mask
    band: FrequencyBand
    windows: Tuple[Tuple[int, int], ...] = ()  # every scaled range, sorted and merged; windows[0] == window

    def __hash__(self) -> int:
        # Hashed once, on first use: the op and the backends key their per-call caches on the spec.
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(tuple(getattr(self, name) for name in self.__dataclass_fields__))
            object.__setattr__(self, "_hash", cached)
        return cached

    @property
    def extra_windows(self) -> Tuple[Tuple[int, int], ...]:
        """The scaled ranges after the first: the op writes them itself, one scaled write each."""
        return self.windows[1:]

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
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; convert it with "
                        ".to_dense()")
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


def _finite_float(name: str, value) -> float:
    """A Python real number as a finite float; ValueError naming the argument for inf, NaN or overflow."""
    try:
        result = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be a finite number, got {value!r} (too large for a float)") from None
    # Comparisons, not math.isfinite: Dynamo traces them on a symbolic float too (NaN fails both).
    if not -math.inf < result < math.inf:
        raise ValueError(f"{name} must be a finite number, got {result!r}")
    return result


def check_factor(name: str, value, device: torch.device) -> None:
    """b and s: a finite Python real number or a 0-d real tensor on the CPU or on the inputs' device.

    Tensor values are not inspected (reading one would synchronise with its device): a NaN or inf in a
    tensor factor propagates into the output like any other arithmetic.
    """
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise TypeError(f"{name} must be a dense 0-d tensor, got layout {value.layout}")
        if value.dim() != 0:
            raise ValueError(f"{name} must be a Python float or a 0-d tensor, got shape {tuple(value.shape)}")
        if not value.dtype.is_floating_point and value.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be a real number tensor, got dtype {value.dtype}")
        if value.device.type != "cpu" and value.device != device:
            raise ValueError(f"{name} must be on the CPU or on the inputs' device {device}, got {value.device}")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python float or a 0-d tensor, got {type(value).__name__}")
    _finite_float(name, value)


def check_tensors(x, h) -> None:
    """Everything make_spec checks about x and h: types, layouts, ranks, dtypes, devices, and that h has
    x's N and trailing dims. Needs no concrete size: under symbolic shapes (torch.compile's dynamic
    shapes, torch.export, make_fx) a size comparison becomes a guard or a constraint of the trace.
    """
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


@dataclass(frozen=True)
class CallOptions:
    """One call's options, validated; nothing here depends on the plane size (the threshold is not clamped)."""

    threshold: Tuple[int, int]  # (t_rows, t_cols) as given, not clamped (clamp_threshold does that)
    version: int
    mask: Mask
    windows: Tuple[Tuple[int, int], ...]  # parse_backbone_channels
    high_gain: float


def check_options(channels, threshold=1, version=1, backbone_channels=None, high_gain=1.0,
                  mask="box") -> CallOptions:
    """Validate the options of a call whose x has ``channels`` (Cx) channels, which may be symbolic.

    Raises TypeError/ValueError naming the argument.
    """
    if isinstance(version, bool) or not isinstance(version, numbers.Integral) or version not in (1, 2):
        raise ValueError(f"version must be 1 or 2 (an int), got {version!r}")
    try:
        mask_kind = Mask(mask)
    except ValueError:
        raise ValueError(f"mask must be one of {[m.value for m in Mask]}, got {mask!r}") from None
    thresholds = parse_threshold(threshold, mask_kind)
    windows = parse_backbone_channels(backbone_channels, channels)
    if isinstance(high_gain, bool) or not isinstance(high_gain, numbers.Real):
        raise TypeError(f"high_gain must be a Python float, got {type(high_gain).__name__}")
    return CallOptions(thresholds, int(version), mask_kind, windows, _finite_float("high_gain", high_gain))


# A threshold past every plane torch can allocate selects what any larger one does (clamp_threshold caps
# at H//2 + H and H//2 + W//2 + 1), and it fits the op schema's int64: the cap where the plane size is
# not known yet (symbolic shapes); the kernel clamps it to the real plane.
SIZE_FREE_THRESHOLD_CAP = 2 ** 62


def has_symbolic_sizes(x, h) -> bool:
    """True when a size or stride of x or h is symbolic (torch.SymInt: dynamic shapes, export, make_fx)."""
    # The tensors' own flag, two attribute reads: this runs on every eager call. Non-tensors are not
    # symbolic (make_spec then rejects them with its message).
    try:
        return x._has_symbolic_sizes_strides or h._has_symbolic_sizes_strides
    except AttributeError:
        return False


def make_spec(
    x: torch.Tensor,
    h: torch.Tensor,
    threshold: ThresholdArg = 1,
    version: int = 1,
    backbone_channels=None,
    high_gain: float = 1.0,
    mask: str = "box",
) -> FreeUSpec:
    """Validate one call's arguments and describe it. Raises TypeError/ValueError naming the argument.

    ``threshold``: an int or a (t_rows, t_cols) pair (box only, unless equal). ``backbone_channels``:
    see parse_backbone_channels. Needs concrete sizes (the frequency band depends on the plane).
    """
    check_tensors(x, h)
    options = check_options(x.shape[1], threshold, version, backbone_channels, high_gain, mask)
    height, width = x.shape[-2], x.shape[-1]
    thresholds = clamp_threshold(height, width, options.threshold, options.mask)
    windows = options.windows
    return FreeUSpec(
        batch=x.shape[0],
        backbone_channels_total=x.shape[1],
        skip_channels=h.shape[1],
        frames=x.shape[2] if x.dim() == 5 else 1,
        height=height,
        width=width,
        ndim=x.dim(),
        dtype=x.dtype,
        threshold=thresholds,
        version=options.version,
        window=windows[0] if windows else (0, 0),
        high_gain=options.high_gain,
        mask=options.mask,
        band=frequency_band(height, width, thresholds, options.mask),
        windows=windows,
    )


def _plain_key(value):
    """A cache key for an option value of a plain type (int, float, str, None, nested tuples/lists of ints),
    tagged with its type so 2 and 2.0 differ; None for anything else (then the call is validated in full)."""
    kind = type(value)
    if value is None or kind is int or kind is str:
        return (kind, value)
    if kind is float:
        return (kind, value) if math.isfinite(value) else None
    if kind is tuple or kind is list:
        inner = tuple(_plain_key(v) for v in value)
        return None if any(k is None for k in inner) else (tuple, inner)
    return None


_SPEC_CACHE: dict = {}
_SPEC_CACHE_LIMIT = 4096


def cached_spec(x, h, threshold=1, version=1, backbone_channels=None, high_gain=1.0, mask="box") -> FreeUSpec:
    """make_spec, memoised on everything it validates: both tensors' shape, dtype, device and layout, and
    each option's value and type. Inputs of other kinds (tensor subclasses count as tensors; options of
    other types) are validated in full every time, so the cache never lets a bad input through: a key is
    stored only after make_spec accepted it.
    """
    if not (isinstance(x, torch.Tensor) and isinstance(h, torch.Tensor)):
        return make_spec(x, h, threshold, version, backbone_channels, high_gain, mask)
    options = (_plain_key(threshold), _plain_key(version), _plain_key(backbone_channels), _plain_key(high_gain),
               _plain_key(mask))
    if None in options:
        return make_spec(x, h, threshold, version, backbone_channels, high_gain, mask)
    key = (x.shape, x.dtype, x.device, x.layout, h.shape, h.dtype, h.device, h.layout, options)
    try:
        spec = _SPEC_CACHE.get(key)
    except TypeError:  # symbolic sizes (a fake tensor under dynamic shapes) do not hash
        return make_spec(x, h, threshold, version, backbone_channels, high_gain, mask)
    if spec is None:
        spec = make_spec(x, h, threshold, version, backbone_channels, high_gain, mask)
        if len(_SPEC_CACHE) >= _SPEC_CACHE_LIMIT:
            _SPEC_CACHE.clear()
        _SPEC_CACHE[key] = spec
    return spec


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The output follows x: channels_last(_3d) when x is in that format (and not plainly contiguous)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def allocate_output(x: torch.Tensor, skip_channels: int) -> torch.Tensor:
    """Uninitialised output of shape (N, Cx + Ch, ...) in x's dtype, device and memory format."""
    shape = list(x.shape)
    shape[1] += skip_channels
    if x.is_contiguous():  # the common case, without the memory-format keyword's parse (per-call cost)
        return x.new_empty(shape)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))
