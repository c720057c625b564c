"""Published FreeU factors, by model family.

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

All presets are FreeU version 1 factors as published; ``enable_freeu(..., version=2)`` applies the same
numbers with the structure-related backbone scaling.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Dict, Mapping

__all__ = ["FreeUPreset", "PRESETS", "get_preset"]


@dataclass(frozen=True)
class FreeUPreset:
    """One set of published FreeU factors: stage 1 and stage 2 backbone (b) and skip (s) factors."""

    name: str
    b1: float
    b2: float
    s1: float
    s2: float
    source: str

    def as_kwargs(self) -> Dict[str, float]:
        """The four factors as keyword arguments: ``enable_freeu(model, **preset.as_kwargs())``."""
        factors = asdict(self)
        return {key: factors[key] for key in ("b1", "b2", "s1", "s2")}


_OFFICIAL_README = "https://github.com/ChenyangSi/FreeU#parameters"
_VIDEO_EXAMPLE = "https://github.com/lyn-rgb/FreeU_Diffusers (Video Pipelines), cited by diffusers' FreeU guide"

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
    }
)


def _normalise(name: str) -> str:
    # "SD1.5", "sd-1.5", "sd_15" and "SD 1.5" all name the same preset.
    return "".join(ch for ch in name.lower() if ch not in " -_.")


def get_preset(name: str) -> FreeUPreset:
    """The preset called ``name`` (case, spaces, dots, dashes and underscores are ignored: "SD1.5" works).

    Raises TypeError if ``name`` is not a string and ValueError naming the known presets if it is unknown.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    preset = PRESETS.get(_normalise(name))
    if preset is None:
        raise ValueError(f"name must be one of {sorted(PRESETS)}, got {name!r}")
    return preset
