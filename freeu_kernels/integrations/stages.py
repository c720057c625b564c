"""FreeU's settings model, shared by every integration: stages, channel windows and the step schedule.

A *stage* is what FreeU does at one kind of skip concat: scale a window of the backbone's channels by the
backbone factor (version 1) or by ``(b - 1) * m^ + 1`` (version 2), and filter the skip features with gain
``skip_factor`` inside a low-frequency box and ``high_gain`` outside it. Integrations pick the stage of a
concat by the backbone's channel count (the official code, ComfyUI, Forge and the A1111 extension all do),
or by the up block (diffusers).

The schedule says which denoising steps run FreeU and how strongly: a strength ``r`` in [0, 1] per U-Net
call; every factor ``f`` of a stage becomes ``lerp(1, f, r)`` (``r = 0`` is a plain concat). The three
peers map "start" and "stop" fractions to steps differently (step ``i`` of ``N``):

- "progress" (this package's default): on when ``start <= i / N < stop``;
- "forge" (Forge's built-in FreeU, "Start step" / "End step"): on when ``start <= i / (N - 1) <= stop``
  (Forge divides by zero for N = 1; here the single step sits at position 0);
- "webui" (ljleb/sd-webui-freeu, "Start At Step" / "Stop At Step"): on when
  ``int(start * N) <= i < int(stop * N)``.

``smoothness`` (the extension's "Transition Smoothness") blends that on/off strength with a ramp that rises
linearly from 0 at the first step to 1 at the start position and falls linearly back to 0 at the stop
position: ``r = (1 - smoothness) * on + smoothness * ramp``. The ramp is expressed in each rule's own
position (i for "webui", i / N or i / (N - 1) for the others), so "webui" with smoothness is the
extension's schedule exactly.

Every number a schedule holds lives in one small tensor moved to the U-Net's device (float64, so that
``int(start * N)`` and ``i / (N - 1)`` round exactly as the peers' Python does; float32 on MPS, which has
no float64), so changing the window or the smoothness between calls neither recompiles a
``torch.compile`` U-Net nor gets baked into a CUDA graph.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence, Tuple, Union

import torch

from ..ops import fused_concat
from ..spec import Mask

__all__ = [
    "ChannelWindow",
    "FreeUStage",
    "FreeUSchedule",
    "SCHEDULE_RULES",
    "denoising_step",
    "denoising_progress",
]

SCHEDULE_RULES = ("progress", "forge", "webui")
# Timestep-fraction progress when no scheduler says how many steps the run has.
DEFAULT_TRAIN_TIMESTEPS = 1000

ChannelRanges = Tuple[Tuple[int, int], ...]


# --------------------------------------------------------------------------------------------------
# Argument checks shared by the stage and the schedule
# --------------------------------------------------------------------------------------------------


def check_real(name: str, value, *, minimum: Optional[float] = None) -> float:
    """A finite real number (a 0-d tensor is read once, on the host), else TypeError/ValueError naming it."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and float(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return float(value)


def _check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(value).__name__}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def check_version(name: str, version) -> int:
    """1 or 2, else ValueError naming the argument."""
    if isinstance(version, bool) or version not in (1, 2):
        raise ValueError(f"{name} must be 1 or 2, got {version!r}")
    return int(version)


def check_threshold(name: str, threshold) -> Union[int, Tuple[int, int]]:
    """An int >= 0 or a (rows, cols) pair of them (the op's rectangular box), else TypeError/ValueError."""
    values = threshold if isinstance(threshold, (tuple, list)) else (threshold,)
    if len(values) not in (1, 2):
        raise ValueError(f"{name} must be an int or a (rows, cols) pair, got {threshold!r}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int or a (rows, cols) pair of ints, got {threshold!r}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {threshold!r}")
    if len(values) == 1:
        return int(values[0])
    rows, cols = (int(v) for v in values)
    return rows if rows == cols else (rows, cols)  # an equal pair is the square box: keep the int form


def check_mask(name: str, mask) -> str:
    """"box" or "radial", else ValueError naming the argument."""
    try:
        return Mask(mask).value
    except ValueError:
        raise ValueError(f"{name} must be one of {[m.value for m in Mask]}, got {mask!r}") from None


# --------------------------------------------------------------------------------------------------
# Backbone channel windows
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChannelWindow:
    """The A1111 extension's backbone channel region: ``offset`` and ``width`` as fractions of Cx.

    With ``n`` = Cx, the region runs from channel ``round(offset * n)`` to ``round((offset + width) * n)``,
    both included (Python's ``round``, halves to even), so the default (0, 0.5) scales ``n / 2 + 1``
    channels of an even ``n`` and a width of 0 still scales one channel. When ``offset + width > 1`` the
    region wraps: it is every channel *outside* ``round((offset + width - 1) * n) ..  round(offset * n)``
    (those two boundary channels are not scaled), i.e. two ranges, one at each end. A negative width
    extends the region to the left of ``offset``; widths above 1 count as 1; offsets wrap modulo 1.
    """

    offset: float = 0.0
    width: float = 0.5

    def __post_init__(self):
        check_real("offset", self.offset)
        check_real("width", self.width)

    def ranges(self, channels: int) -> ChannelRanges:
        """The scaled channels as half-open ``(start, stop)`` ranges (none, one or two) of ``channels``."""
        offset, width = float(self.offset), float(self.width)
        if width < 0:  # the region [offset + width, offset]
            offset, width = offset + width, -width
        width = min(width, 1.0)
        offset = math.fmod(offset - math.floor(offset), 1.0)  # into [0, 1); fmod maps a rounded-up 1.0 to 0
        n = channels
        if width + offset <= 1:
            first, last = round(offset * n), round((width + offset) * n)
            ranges = ((first, min(last + 1, n)),)
        else:
            # Wrapped: the complement of the inclusive run [excluded_first, excluded_last].
            excluded_first, excluded_last = round((width + offset - 1) * n), round(offset * n)
            ranges = ((0, min(excluded_first, n)), (min(excluded_last + 1, n), n))
        return tuple((start, stop) for start, stop in ranges if stop > start)


BackboneChannels = Union[None, Tuple[int, int], Sequence[Tuple[int, int]], ChannelWindow]


def _check_backbone_channels(channels) -> Union[None, ChannelWindow, ChannelRanges]:
    """None, a ChannelWindow, or (start, stop) pair(s) of ints, normalised to a tuple of pairs."""
    if channels is None or isinstance(channels, ChannelWindow):
        return channels
    if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence) or len(channels) == 0:
        raise TypeError(
            "channels must be None, a ChannelWindow, a (start, stop) pair or a sequence of pairs, "
            f"got {channels!r}"
        )
    pairs = (channels,) if isinstance(channels[0], numbers.Integral) else tuple(channels)
    checked = []
    for pair in pairs:
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(f"channels must hold (start, stop) pairs, got {channels!r}")
        start, stop = pair
        for value in pair:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"channels must hold int (start, stop) pairs, got {channels!r}")
        if not 0 <= start <= stop:
            raise ValueError(f"channels must satisfy 0 <= start <= stop, got {channels!r}")
        checked.append((int(start), int(stop)))
    return tuple(checked)


def _op_backbone_channels(ranges: Optional[ChannelRanges]):
    """fused_concat's ``backbone_channels``: None (the default half), one pair, several pairs, or (0, 0)."""
    if ranges is None or len(ranges) > 1:
        return ranges
    return ranges[0] if ranges else (0, 0)


# --------------------------------------------------------------------------------------------------
# One stage
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FreeUStage:
    """FreeU's settings at one kind of skip concat. Fields left None take enable_freeu's value.

    Args:
        backbone_factor: b (version 1 multiplies the channel window by b; version 2 by (b - 1) m^ + 1).
        skip_factor: s, the gain of the skip features' low frequencies (inside the box).
        channels: the scaled backbone channels: None (the first half, ``[0, Cx // 2)``, as the official
            code), one ``(start, stop)`` pair, a sequence of pairs, or a :class:`ChannelWindow` (the A1111
            extension's offset and width).
        high_gain: gain of the frequencies outside the box (the extension's "skip high-end factor").
        threshold: the box half-size, an int or a ``(rows, cols)`` pair.
        cutoff: the extension's cutoff ratio; when given it replaces ``threshold`` with the box
            ``(max(1, floor(H // 2 * cutoff)), max(1, floor(W // 2 * cutoff)))`` of each concat's plane.
        version: 1 or 2. mask: "box" or "radial".
    """

    backbone_factor: float
    skip_factor: float
    channels: BackboneChannels = None
    high_gain: Optional[float] = None
    threshold: Union[None, int, Tuple[int, int]] = None
    cutoff: Optional[float] = None
    version: Optional[int] = None
    mask: Optional[str] = None

    def __post_init__(self):
        # Frozen: normalise through object.__setattr__ once, so equal settings compare equal.
        normalised = dict(
            backbone_factor=check_real("backbone_factor", self.backbone_factor),
            skip_factor=check_real("skip_factor", self.skip_factor),
            channels=_check_backbone_channels(self.channels),
            high_gain=None if self.high_gain is None else check_real("high_gain", self.high_gain),
            threshold=None if self.threshold is None else check_threshold("threshold", self.threshold),
            cutoff=None if self.cutoff is None else check_real("cutoff", self.cutoff, minimum=0.0),
            version=None if self.version is None else check_version("version", self.version),
            mask=None if self.mask is None else check_mask("mask", self.mask),
        )
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    def with_defaults(self, *, high_gain: float, threshold, version: int, mask: str) -> "FreeUStage":
        """This stage with every unset field taken from the given (enable_freeu-level) values."""
        given = dict(high_gain=high_gain, threshold=threshold, version=version, mask=mask)
        return replace(self, **{name: value for name, value in given.items() if getattr(self, name) is None})

    def structure(self) -> tuple:
        """Every field but the two factors: what a compiled graph depends on (changing it re-installs)."""
        return tuple(getattr(self, f.name) for f in fields(self) if f.name not in ("backbone_factor", "skip_factor"))

    def backbone_ranges(self, channels: int) -> Optional[ChannelRanges]:
        """The scaled channel ranges of a backbone with ``channels`` channels; None means the default half."""
        if isinstance(self.channels, ChannelWindow):
            return self.channels.ranges(channels)
        return self.channels

    def threshold_for(self, height: int, width: int) -> Union[int, Tuple[int, int]]:
        """The op's ``threshold`` on an H x W plane: ``cutoff``'s box when set, else ``threshold``."""
        if self.cutoff is None:
            return 1 if self.threshold is None else self.threshold
        rows = max(1, math.floor(height // 2 * self.cutoff))
        cols = max(1, math.floor(width // 2 * self.cutoff))
        return rows if rows == cols else (rows, cols)

    def concat(self, x: torch.Tensor, h: torch.Tensor, *, backbone_factor=None, skip_factor=None,
               high_gain: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
        """``cat([x', h'], 1)``: this stage's FreeU at one concat, one :func:`~freeu_kernels.fused_concat` call.

        ``backbone_factor`` and ``skip_factor`` default to the stage's; pass 0-d tensors (a schedule's
        ramped factors) to change them without recompiling. ``high_gain`` may be a 0-d tensor too (a ramped
        high gain): the op takes its high gain as a Python float (a graph constant), so a tensor one goes
        through the filter's linearity, ``filter(h; s, g) = filter(h; s - g + 1, 1) + (g - 1) h`` (the
        filter is ``g h + (s - g) P h``, P the box's band projection), at the cost of one extra pass over
        the skip half. Unset fields use the op's defaults (version 1, threshold 1, box, high gain 1).
        """
        b = self.backbone_factor if backbone_factor is None else backbone_factor
        s = self.skip_factor if skip_factor is None else skip_factor
        options = dict(
            threshold=self.threshold_for(x.shape[-2], x.shape[-1]),
            backbone_channels=_op_backbone_channels(self.backbone_ranges(x.shape[1])),
            version=self.version or 1, mask=self.mask or "box", backend=backend,
        )
        if not isinstance(high_gain, torch.Tensor):
            gain = self.high_gain if high_gain is None else high_gain
            return fused_concat(x, h, b, s, high_gain=1.0 if gain is None else gain, **options)
        both = fused_concat(x, h, b, s - high_gain + 1, high_gain=1.0, **options)
        both[:, x.shape[1]:].add_(h * (high_gain - 1).to(h.dtype))
        return both


# --------------------------------------------------------------------------------------------------
# Denoising position and the schedule
# --------------------------------------------------------------------------------------------------


def _schedule_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def denoising_step(timestep, timesteps: Optional[torch.Tensor] = None,
                   num_train_timesteps: int = DEFAULT_TRAIN_TIMESTEPS,
                   device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
    """``(i, N)``: the step index of this U-Net call (a 0-d tensor) and the number of steps (an int).

    With the run's ``timesteps`` (a scheduler's descending table), ``i`` counts the timesteps larger than
    ``timestep`` and ``N`` is the table's length: step i of N for first-order schedulers (second-order ones
    list most timesteps twice, so both counts about double). Without a table, every training timestep is a
    step: ``i = T - 1 - t`` of ``N = T``. Only tensor operations: it traces into a compiled graph without a
    break. A batch of timesteps uses its first entry (diffusers pipelines give every sample the same one).
    """
    current = torch.as_tensor(timestep, device=device).reshape(-1)[0]
    dtype = dtype or _schedule_dtype(current.device)
    current = current.to(dtype)
    if timesteps is not None and timesteps.numel() > 0:
        table = timesteps.to(device=current.device, dtype=dtype)
        return (table > current).sum().to(dtype), int(table.numel())
    return (num_train_timesteps - 1 - current), int(num_train_timesteps)


def denoising_progress(timestep, timesteps: Optional[torch.Tensor] = None,
                       num_train_timesteps: int = DEFAULT_TRAIN_TIMESTEPS,
                       device: Optional[torch.device] = None) -> torch.Tensor:
    """Fraction of the denoising already done when the U-Net is called at ``timestep``: i / N, float32.

    See :func:`denoising_step` for i and N; without a timestep table this is ``(T - 1 - t) / T``, close to
    i / N for evenly spaced schedules.
    """
    step, steps = denoising_step(timestep, timesteps, num_train_timesteps, device)
    return (step / steps).to(torch.float32)


def _ramp(position: torch.Tensor, start: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    """0 at position 0, rising linearly to 1 at ``start``, falling linearly to 0 at ``stop``; 0 if equal.

    Clamped to [0, 1]. The divisions by ``start`` and ``start - stop`` only matter where ``where`` selects
    them, where they are non-zero.
    """
    rising = (position / start).clamp(0.0, 1.0)
    falling = (1 + (position - start) / (start - stop)).clamp(0.0, 1.0)
    ramp = torch.where(position < start, rising, falling)
    return torch.where(start == stop, torch.zeros_like(ramp), ramp)


class FreeUSchedule:
    """Which denoising steps run FreeU, and how strongly: ``start``, ``stop``, ``rule``, ``smoothness``.

    ``FreeUSchedule(stop=0.6)`` runs FreeU for the first 60% of the steps, ``FreeUSchedule(start=0.2)``
    skips the first 20%; ``rule`` chooses how those fractions map to steps ("progress", the default:
    ``start <= i / N < stop``; "forge": Forge's ``start <= i / (N - 1) <= stop``; "webui": the A1111
    extension's ``int(start * N) <= i < int(stop * N)``; see this module's docstring) and ``smoothness``
    in [0, 1] ramps the factors in and out linearly instead of switching them (the extension's "Transition
    Smoothness"). Pass it as ``enable_freeu(..., schedule=...)``. :meth:`set` changes the numbers in place,
    which a compiled U-Net sees without recompiling; the rule is fixed at construction.
    """

    def __init__(self, start: float = 0.0, stop: float = 1.0, *, rule: str = "progress", smoothness: float = 0.0):
        if rule not in SCHEDULE_RULES:
            raise ValueError(f"rule must be one of {SCHEDULE_RULES}, got {rule!r}")
        self.rule = rule
        # start, stop, smoothness. Never an inference tensor (a schedule made under inference_mode must
        # still take set() outside it, which writes in place).
        with torch.inference_mode(False):
            self.values = torch.zeros(3, dtype=torch.float64, device="cpu")
        self._fill(*self._checked(start, stop, smoothness))

    @staticmethod
    def _checked(start, stop, smoothness) -> Tuple[float, float, float]:
        start, stop = _check_fraction("start", start), _check_fraction("stop", stop)
        if start > stop:
            raise ValueError(f"start must be <= stop, got start={start}, stop={stop}")
        return start, stop, _check_fraction("smoothness", smoothness)

    def _fill(self, start: float, stop: float, smoothness: float) -> None:
        for index, value in enumerate((start, stop, smoothness)):
            self.values[index].fill_(value)

    @property
    def start(self) -> float:
        """The start fraction (FreeU's first step under the rule)."""
        return float(self.values[0])

    @property
    def stop(self) -> float:
        """The stop fraction (FreeU's end under the rule)."""
        return float(self.values[1])

    @property
    def smoothness(self) -> float:
        """0 switches FreeU on and off; 1 uses the linear ramp only; in between, a blend."""
        return float(self.values[2])

    def set(self, start: Optional[float] = None, stop: Optional[float] = None,
            smoothness: Optional[float] = None) -> "FreeUSchedule":
        """Change the numbers in place (None keeps one); a compiled U-Net does not recompile."""
        self._fill(*self._checked(
            self.start if start is None else start,
            self.stop if stop is None else stop,
            self.smoothness if smoothness is None else smoothness,
        ))
        return self

    def strength(self, step: torch.Tensor, steps: int) -> torch.Tensor:
        """FreeU's strength r in [0, 1] at step ``step`` (0-d tensor) of ``steps``: 1 on, 0 off.

        Computed in this schedule's dtype on its device, with only tensor operations.
        """
        start, stop, smoothness = self.values.unbind(0)
        step = step.to(self.values)
        if self.rule == "webui":
            position, start, stop = step, torch.floor(start * steps), torch.floor(stop * steps)
            on = (start <= position) & (position < stop)
        elif self.rule == "forge":
            position = step / (steps - 1) if steps > 1 else torch.zeros_like(step)
            on = (start <= position) & (position <= stop)
        else:
            position = step / steps
            on = (start <= position) & (position < stop)
        on = on.to(self.values.dtype)
        return (1 - smoothness) * on + smoothness * _ramp(position, start, stop)

    def to(self, device: Union[str, torch.device]) -> "FreeUSchedule":
        """Move the numbers to ``device`` (the integration does this for the U-Net's device)."""
        device = torch.device(device)
        if self.values.device != device:
            with torch.inference_mode(False):  # as in __init__ (the integration moves it mid-forward)
                self.values = self.values.to(device=device, dtype=_schedule_dtype(device))
        return self

    def __repr__(self) -> str:
        return (f"FreeUSchedule(start={self.start}, stop={self.stop}, rule={self.rule!r}, "
                f"smoothness={self.smoothness})")


def as_schedule(schedule, rule: str = "progress") -> Optional[FreeUSchedule]:
    """A FreeUSchedule from a FreeUSchedule, a ``(start, stop)`` pair (read with ``rule``) or None."""
    if schedule is None or isinstance(schedule, FreeUSchedule):
        return schedule
    if isinstance(schedule, (tuple, list)) and len(schedule) == 2:
        return FreeUSchedule(*schedule, rule=rule)
    raise TypeError(
        f"schedule must be a FreeUSchedule, a (start, stop) pair or None, got {type(schedule).__name__}"
    )
