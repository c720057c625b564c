"""What the peers compute, re-implemented in the test suite from their semantics (own code, not theirs).

Read from (and only learned from, never copied):
- ljleb/sd-webui-freeu, lib_free_u/unet.py and global_state.py ("webui"): three stages chosen by the
  backbone's channel count (1280, 640, 320 on SD: 4, 2, 1 times the model channels); per stage a backbone
  factor, an offset/width channel region (inclusive ends after Python's round; the complement of such a run
  when it wraps), a skip factor, a skip "high end" factor and a cutoff ratio giving a per-axis box;
  versions 1 and 2; start/stop as ``int(fraction * steps)`` with a "transition smoothness" ramp; every
  factor f becomes lerp(1, f, strength), and strength 0 is a plain concat.
- Forge, extensions-builtin/sd_forge_freeu/scripts/forge_freeu.py: version 2 on the first half of the
  backbone channels, threshold 1, stages 4x and 2x the model channels, on when ``i / (N - 1)`` is in
  [start, end].
- ComfyUI, comfy_extras/nodes_freelunch.py: FreeU (version 1) and FreeU_V2, threshold 1, same stages.

Every function here works on one concat's (backbone, skip) pair of 4-D tensors, computes in float32 the way
the peers do (FFT with a mask of the plane's size) and returns new tensors. The oracle is what these give.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

# ----------------------------------------------------------------------------------------------------------
# Shared pieces: the FFT box filter and the version-2 structure map, as the peers write them
# ----------------------------------------------------------------------------------------------------------


def fft_box_filter(skip: torch.Tensor, inside: float, outside: float, rows: int, cols: int) -> torch.Tensor:
    """Gain ``inside`` on the shifted spectrum's ``[H//2 - rows : H//2 + rows] x [W//2 - cols : W//2 + cols]``
    (Python slices, so the box is asymmetric and clamps), ``outside`` elsewhere; float32; cast back."""
    spectrum = torch.fft.fftshift(torch.fft.fftn(skip.float(), dim=(-2, -1)), dim=(-2, -1))
    height, width = spectrum.shape[-2:]
    gains = torch.full(spectrum.shape, float(outside))
    gains[..., height // 2 - rows : height // 2 + rows, width // 2 - cols : width // 2 + cols] = inside
    filtered = torch.fft.ifftn(torch.fft.ifftshift(spectrum * gains, dim=(-2, -1)), dim=(-2, -1)).real
    return filtered.to(skip.dtype)


def normalised_mean(backbone: torch.Tensor) -> torch.Tensor:
    """Version 2's map: the channel mean, rescaled to [0, 1] per sample (N, 1, H, W)."""
    mean = backbone.mean(dim=1, keepdim=True)
    flat = mean.reshape(mean.shape[0], -1)
    low = flat.min(dim=1).values.reshape(-1, 1, 1, 1)
    high = flat.max(dim=1).values.reshape(-1, 1, 1, 1)
    return (mean - low) / (high - low)


def lerp(a: float, b: float, weight: float) -> float:
    return (1 - weight) * a + weight * b


# ----------------------------------------------------------------------------------------------------------
# ljleb/sd-webui-freeu
# ----------------------------------------------------------------------------------------------------------


@dataclass
class WebuiStage:
    """One stage of the extension, its defaults: the fields of its StageInfo."""

    backbone_factor: float = 1.0
    skip_factor: float = 1.0
    backbone_offset: float = 0.0
    backbone_width: float = 0.5
    skip_cutoff: float = 0.0
    skip_high_end_factor: float = 1.0


@dataclass
class WebuiSettings:
    """The extension's whole setting. Its UI defaults: Version 2 and the "SD1.4 Recommendations" stages."""

    stages: List[WebuiStage] = field(default_factory=lambda: [
        WebuiStage(1.2, 0.9), WebuiStage(1.4, 0.2), WebuiStage(1.0, 1.0),
    ])
    version: int = 2
    start: float = 0.0
    stop: float = 1.0
    smoothness: float = 0.0


def webui_scaled_channels(channels: int, offset: float, width: float) -> List[int]:
    """The channel indices the extension scales, as a plain list (membership, not ranges)."""
    if width < 0:
        offset, width = offset + width, -width
    width = min(width, 1.0)
    while offset < 0:  # offsets are taken modulo 1
        offset += 1.0
    offset = math.fmod(offset, 1.0)
    if offset + width <= 1:
        low, high = round(offset * channels), round((offset + width) * channels)
        return [c for c in range(channels) if low <= c <= high]
    low, high = round((offset + width - 1) * channels), round(offset * channels)
    return [c for c in range(channels) if not low <= c <= high]


def webui_strength(step: int, steps: int, start: float, stop: float, smoothness: float) -> float:
    """The extension's schedule at sampling step ``step`` of ``steps`` (float fractions)."""
    first, last = int(start * steps), int(stop * steps)
    on = 1.0 if first <= step < last else 0.0
    if first == last:
        ramp = 0.0
    elif step < first:
        ramp = min(1.0, max(0.0, step / first))
    else:
        ramp = min(1.0, max(0.0, 1 + (step - first) / (first - last)))
    return lerp(on, ramp, smoothness)


def webui_concat(backbone: torch.Tensor, skip: torch.Tensor, stage: WebuiStage, version: int,
                 strength: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """The extension at one concat of a stage: (scaled backbone, filtered skip)."""
    if strength == 0:
        return backbone, skip
    b = lerp(1, stage.backbone_factor, strength)
    s = lerp(1, stage.skip_factor, strength)
    high = lerp(1, stage.skip_high_end_factor, strength)
    channels = webui_scaled_channels(backbone.shape[1], stage.backbone_offset, stage.backbone_width)
    scale = b if version == 1 else 1 + (b - 1) * normalised_mean(backbone)
    backbone = backbone.clone()
    if channels:
        index = torch.tensor(channels)
        backbone[:, index] = backbone[:, index] * scale
    if s != 1 or high != 1:
        height, width = skip.shape[-2:]
        rows = max(1, math.floor(height // 2 * stage.skip_cutoff))
        cols = max(1, math.floor(width // 2 * stage.skip_cutoff))
        skip = fft_box_filter(skip, s, high, rows, cols)
    return backbone, skip


def webui_stage_of(channels: int, model_channels: int, settings: WebuiSettings) -> Optional[WebuiStage]:
    """The extension's stage lookup: backbone widths 4, 2, 1 x the model channels (1280, 640, 320 on SD)."""
    widths = [4 * model_channels, 2 * model_channels, model_channels]
    return settings.stages[widths.index(channels)] if channels in widths else None


# ----------------------------------------------------------------------------------------------------------
# Forge's built-in FreeU and ComfyUI's FreeU / FreeU_V2 (the official code path)
# ----------------------------------------------------------------------------------------------------------

FORGE_DEFAULTS = dict(b1=1.01, b2=1.02, s1=0.99, s2=0.95, start=0.0, end=1.0)
COMFY_FREEU_DEFAULTS = dict(b1=1.1, b2=1.2, s1=0.9, s2=0.2)
COMFY_FREEU_V2_DEFAULTS = dict(b1=1.3, b2=1.4, s1=0.9, s2=0.2)


def forge_on(step: int, steps: int, start: float, end: float) -> bool:
    """Forge's schedule: the step's fraction i / (N - 1) within [start, end], both ends included."""
    fraction = step / (steps - 1)
    return start <= fraction <= end


def official_concat(backbone: torch.Tensor, skip: torch.Tensor, model_channels: int, factors: dict,
                    version: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's FreeU (version 1) / FreeU_V2 and Forge (version 2): stage by channels, first half, t = 1."""
    stage = {4 * model_channels: "1", 2 * model_channels: "2"}.get(backbone.shape[1])
    if stage is None:
        return backbone, skip
    b, s = factors["b" + stage], factors["s" + stage]
    half = backbone.shape[1] // 2
    scale = b if version == 1 else (b - 1) * normalised_mean(backbone) + 1
    backbone = torch.cat([backbone[:, :half] * scale, backbone[:, half:]], dim=1)
    return backbone, fft_box_filter(skip, s, 1.0, 1, 1)
