"""Published FreeU factors by model family, and the defaults of the A1111 extension and of Forge.

Sources, checked against the repositories' history:

- SD1.4, SD1.5, SD2.1, SDXL: the "Parameters" section of the official README,
  https://github.com/ChenyangSi/FreeU#parameters (as of commit 3676d36, Dec 2024). Earlier revisions
  listed other values (SD1.4 b1=1.2, SD2.1 b1=1.1 b2=1.2, SDXL b1=1.1 b2=1.2 s1=0.6 s2=0.4); the current
  ones are used here.
- ZeroScope: the official README has no video section in any revision. The video factors come from the
  "Video Pipelines" example of https://github.com/lyn-rgb/FreeU_Diffusers (cerspense/zeroscope_v2_576w),
  which diffusers' FreeU guide (docs/source/en/using-diffusers/freeu.md, "Text-to-video generation")
  cites for its ZeroScope example.
- ModelScope: no source publishes factors specific to it. ZeroScope is a fine-tune of ModelScope's
  text-to-video UNet3D (same architecture and channel widths), so the ZeroScope factors are reused; treat
  this preset as a starting point, not a published optimum.
- "webui": what https://github.com/ljleb/sd-webui-freeu (lib_free_u/, scripts/freeu.py) runs when it is
  switched on and nothing else is touched: "Version 2", its first preset ("SD1.4 Recommendations": stage
  1 b=1.2 s=0.9, stage 2 b=1.4 s=0.2, stage 3 b=1 s=1), backbone offset 0 and width 0.5 (C/2 + 1
  channels), skip cutoff 0 (a 1 x 1 box), high-end factor 1, start 0, stop 1, smoothness 0. Its stages
  are the backbone widths 1280, 640 and 320, i.e. 4, 2 and 1 times the model channels (320) of SD 1.x,
  2.x and XL; this preset keys them on the model's own channel count.
- "forge": Forge's built-in "FreeU Integrated" (extensions-builtin/sd_forge_freeu): version 2 always,
  the "Forge default" factors b1=1.01 b2=1.02 s1=0.99 s2=0.95, stages by channel count (4x and 2x the
  model channels), start 0 and end 1 under its ``i / (N - 1)`` step rule.

The first six are FreeU version 1 factors as published; ``enable_freeu(..., version=2)`` applies the same
numbers with the structure-related backbone scaling. "webui" and "forge" also set the version, the
placement, the stages and the schedule rule (``enable_freeu`` arguments override each).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Dict, Mapping, Optional, Tuple

from .stages import ChannelWindow, FreeUStage

__all__ = ["FreeUPreset", "PRESETS", "get_preset", "lookup_preset"]


@dataclass(frozen=True)
class FreeUPreset:
    """One named FreeU setting: the four factors and, for the peers' defaults, the rest of their setup.

    ``stages`` (when set) holds ``(multiple of the model channels, FreeUStage)`` pairs: the stage applies
    at concats whose backbone has that many times ``block_out_channels[0]`` channels. None fields leave
    enable_freeu's own defaults.
    """

    name: str
    b1: float
    b2: float
    s1: float
    s2: float
    source: str
    version: Optional[int] = None
    placement: Optional[str] = None
    stages: Optional[Tuple[Tuple[int, FreeUStage], ...]] = None
    schedule_rule: Optional[str] = None

    def as_kwargs(self) -> Dict[str, float]:
        """The four factors as keyword arguments: ``enable_freeu(model, **preset.as_kwargs())``.

        For "webui" and "forge" this is not the whole preset (version, stages and schedule rule are not
        in it): pass ``preset=`` to get those too.
        """
        return dict(b1=self.b1, b2=self.b2, s1=self.s1, s2=self.s2)


_OFFICIAL_README = "https://github.com/ChenyangSi/FreeU#parameters"
_VIDEO_EXAMPLE = "https://github.com/lyn-rgb/FreeU_Diffusers (Video Pipelines), cited by diffusers' FreeU guide"
_WEBUI = "https://github.com/ljleb/sd-webui-freeu defaults (Version 2, 'SD1.4 Recommendations')"
_FORGE = "https://github.com/lllyasviel/stable-diffusion-webui-forge built-in FreeU ('Forge default')"


def _webui_stage(backbone_factor: float, skip_factor: float) -> FreeUStage:
    # The extension's per-stage defaults besides the factors: offset 0, width 0.5, cutoff 0, high end 1.
    return FreeUStage(backbone_factor, skip_factor, channels=ChannelWindow(0.0, 0.5), cutoff=0.0, high_gain=1.0)


PRESETS: Mapping[str, FreeUPreset] = MappingProxyType(
    {
        "sd14": FreeUPreset("sd14", b1=1.3, b2=1.4, s1=0.9, s2=0.2, source=_OFFICIAL_README),
        "sd15": FreeUPreset("sd15", b1=1.5, b2=1.6, s1=0.9, s2=0.2, source=_OFFICIAL_README),
        "sd21": FreeUPreset("sd21", b1=1.4, b2=1.6, s1=0.9, s2=0.2, source=_OFFICIAL_README),
        "sdxl": FreeUPreset("sdxl", b1=1.3, b2=1.4, s1=0.9, s2=0.2, source=_OFFICIAL_README),
        "zeroscope": FreeUPreset("zeroscope", b1=1.2, b2=1.4, s1=0.9, s2=0.2, source=_VIDEO_EXAMPLE),
        "modelscope": FreeUPreset(
            "modelscope", b1=1.2, b2=1.4, s1=0.9, s2=0.2,
            source="ZeroScope's factors (ZeroScope fine-tunes ModelScope's UNet3D); "
            "no ModelScope-specific values are published",
        ),
        "webui": FreeUPreset(
            "webui", b1=1.2, b2=1.4, s1=0.9, s2=0.2, source=_WEBUI, version=2, placement="official",
            stages=((4, _webui_stage(1.2, 0.9)), (2, _webui_stage(1.4, 0.2)), (1, _webui_stage(1.0, 1.0))),
            schedule_rule="webui",
        ),
        "forge": FreeUPreset(
            "forge", b1=1.01, b2=1.02, s1=0.99, s2=0.95, source=_FORGE, version=2, placement="official",
            schedule_rule="forge",
        ),
    }
)


def _normalise(name: str) -> str:
    # "SD1.5", "sd-1.5", "sd_15" and "SD 1.5" all name the same preset.
    return "".join(ch for ch in name.lower() if ch not in " -_.")


def lookup_preset(name, argument: str) -> FreeUPreset:
    """The preset called ``name``; errors name ``argument`` (the caller's parameter)."""
    if not isinstance(name, str):
        raise TypeError(f"{argument} must be a str, got {type(name).__name__}")
    preset = PRESETS.get(_normalise(name))
    if preset is None:
        raise ValueError(f"{argument} must be one of {sorted(PRESETS)}, got {name!r}")
    return preset


def get_preset(name: str) -> FreeUPreset:
    """The preset called ``name`` (case, spaces, dots, dashes and underscores are ignored: "SD1.5" works).

    Raises TypeError if ``name`` is not a string and ValueError naming the known presets if it is unknown.
    """
    return lookup_preset(name, "name")
