"""The benchmark cases: FreeU's concats as they occur in real U-Net decoders, derived from the configs.

How the shapes follow from a config (``decoder_concats`` does exactly this walk; for diffusers'
UNet2DConditionModel with the configs of bench/unet_configs.py):

1. Down path, pushing every output onto the skip stack: ``conv_in`` gives C0 channels at the latent size;
   each down block i has ``layers_per_block`` resnets producing Ci channels at the current size, and every
   block but the last ends with a stride-2 downsample (size -> ceil(size / 2)) whose output is pushed too.
2. Up path, over the channels reversed, each up block has ``layers_per_block + 1`` resnets; resnet j pops
   the top of the stack and concatenates ``[x, skip]`` where x is the previous resnet's (or the mid
   block's, or the previous up block's) output. Every up block but the last upsamples x by 2.

SD 1.5 at 512 px (latent 64, channels 320/640/1280/1280, 2 layers) gives 12 concats:
    up0 @ 8x8:   1280+1280 (x3)                  <- diffusers' FreeU stage 1
    up1 @ 16x16: 1280+1280 (x2), 1280+640        <- diffusers' FreeU stage 2
    up2 @ 32x32: 1280+640, 640+640, 640+320
    up3 @ 64x64: 640+320, 320+320 (x2)
SD 2.1 at 768 px (latent 96, same channels) gives the same pattern at 12, 24, 48 and 96.
SDXL at 1024 px (latent 128, channels 320/640/1280, 2 layers) gives 9 concats:
    up0 @ 32x32: 1280+1280 (x2), 1280+640        <- diffusers' stage 1
    up1 @ 64x64: 1280+640, 640+640, 640+320      <- diffusers' stage 2
    up2 @ 128x128: 640+320, 320+320 (x2)
SDXL at 2048 px doubles every plane (64, 128, 256). The official FreeU code and ComfyUI instead pick the
concats whose backbone has 1280 (stage 1) or 640 (stage 2) channels, so they also touch up2 of SD 1.5 and
the first concat of up3; every shape above is therefore one FreeU meets in some integration.

Video: AnimateDiff-style models run the SD 1.5 U-Net over F frames. freeu_kernels takes the 5-D layout
(N, C, F, H, W); the cases use F = 16 at 512 px and the concats up to 32x32, e.g. (N, 1280, 16, 8, 8).

Per case, bytes moved = 2 * (|x| + |h|): inputs read once and the output written once, what torch.cat
moves and the floor of a fused FreeU.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, replace
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .unet_configs import MODELS

__all__ = [
    "Concat",
    "Family",
    "Case",
    "CrossoverCase",
    "FAMILIES",
    "DTYPES",
    "decoder_concats",
    "op_cases",
    "quick_op_cases",
    "crossover_cases",
    "parse_dtypes",
    "select_cases",
]

DTYPES: Dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
_DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
SHORT_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


@dataclass(frozen=True)
class Concat:
    """One decoder concat: backbone channels, skip channels, plane size and where it sits (up block, resnet)."""

    backbone: int
    skip: int
    size: int
    up_block: int
    resnet: int


def _per_block(value, blocks: int) -> List[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * blocks


def decoder_concats(config: Dict, latent_size: int) -> List[Concat]:
    """Every ``torch.cat([x, skip], 1)`` of a UNet2DConditionModel decoder, in execution order."""
    if latent_size < 1:
        raise ValueError(f"latent_size must be >= 1, got {latent_size}")
    channels = list(config["block_out_channels"])
    layers = _per_block(config["layers_per_block"], len(channels))
    size = latent_size
    skips: List[Tuple[int, int]] = [(channels[0], size)]  # conv_in
    for index, width in enumerate(channels):
        skips += [(width, size)] * layers[index]
        if index < len(channels) - 1:
            size = math.ceil(size / 2)  # 3x3 conv, stride 2, padding 1
            skips.append((width, size))
    backbone = channels[-1]  # the mid block keeps the last width
    concats = []
    for up_index, width in enumerate(reversed(channels)):
        for resnet in range(list(reversed(layers))[up_index] + 1):
            skip_width, skip_size = skips.pop()
            concats.append(Concat(backbone, skip_width, skip_size, up_index, resnet))
            backbone = width
    return concats


@dataclass(frozen=True)
class Family:
    """A group of cases: one model at one resolution (optionally video frames, optionally a size cap)."""

    key: str
    model: str
    image_size: int
    frames: int = 0
    max_plane: Optional[int] = None

    @property
    def title(self) -> str:
        """'SDXL base at 1024 px' (', 16 frames' for video)."""
        video = f", {self.frames} frames" if self.frames else ""
        return f"{MODELS[self.model].title} at {self.image_size} px{video}"

    def concats(self) -> List[Concat]:
        """The decoder concats of this model at this resolution (up to ``max_plane`` when set)."""
        found = decoder_concats(MODELS[self.model].config, self.image_size // 8)
        return [c for c in found if self.max_plane is None or c.size <= self.max_plane]


FAMILIES: Dict[str, Family] = {
    family.key: family
    for family in (
        Family("sd15-512", "sd15", 512),
        Family("sd21-768", "sd21", 768),
        Family("sdxl-1024", "sdxl", 1024),
        Family("sdxl-2048", "sdxl", 2048),
        Family("video-sd15-512-16f", "sd15", 512, frames=16, max_plane=32),
    )
}


@dataclass(frozen=True)
class Case:
    """One op-level measurement: backbone x and skip h shapes, dtype, and the FreeU filter settings.

    ``families`` lists every model/resolution whose decoder contains this concat (identical cases are
    measured once); ``sites`` says where (``up1.r2`` = up block 1, resnet 2).
    """

    x_shape: Tuple[int, ...]
    h_shape: Tuple[int, ...]
    dtype: torch.dtype
    families: Tuple[str, ...] = ("custom",)
    sites: str = ""
    threshold: int = 1
    mask: str = "box"

    def __post_init__(self):
        if len(self.x_shape) not in (4, 5) or len(self.h_shape) != len(self.x_shape):
            raise ValueError(f"x_shape and h_shape must both be 4-D or 5-D, got {self.x_shape}, {self.h_shape}")
        if self.x_shape[0] != self.h_shape[0] or self.x_shape[2:] != self.h_shape[2:]:
            raise ValueError(f"h_shape must match x_shape except in channels, got {self.x_shape}, {self.h_shape}")
        if self.dtype not in SHORT_DTYPE:
            raise TypeError(f"dtype must be a floating torch dtype, got {self.dtype}")

    @property
    def family(self) -> str:
        """The first family listing this concat: the one the case is named after."""
        return self.families[0]

    @property
    def batch(self) -> int:
        """N, the leading dimension of x and h."""
        return self.x_shape[0]

    @property
    def plane(self) -> str:
        """Trailing dims as text: '64x64', or '16fx8x8' for video."""
        dims = self.x_shape[2:]
        return (f"{dims[0]}fx" if len(dims) == 3 else "") + f"{dims[-2]}x{dims[-1]}"

    @property
    def name(self) -> str:
        """Family, channels and plane: 'sdxl-1024 640+640@64x64' (batch and dtype are separate columns)."""
        return f"{self.family} {self.x_shape[1]}+{self.h_shape[1]}@{self.plane}"

    @property
    def label(self) -> str:
        """Unique text for progress lines and plots: name, batch and dtype."""
        return f"{self.name} b{self.batch} {SHORT_DTYPE[self.dtype]}"

    @property
    def bytes_moved(self) -> int:
        """2 (|x| + |h|) bytes: read both inputs once, write the output once."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * (math.prod(self.x_shape) + math.prod(self.h_shape)) * itemsize


def _family_cases(family: Family, batch: int, dtype: torch.dtype) -> List[Case]:
    by_shape: Dict[Tuple[int, int, int], List[str]] = {}
    for concat in family.concats():
        key = (concat.backbone, concat.skip, concat.size)
        by_shape.setdefault(key, []).append(f"up{concat.up_block}.r{concat.resnet}")
    frames = (family.frames,) if family.frames else ()
    return [
        Case((batch, cx) + frames + (size, size), (batch, ch) + frames + (size, size), dtype, (family.key,),
             " ".join(sites))
        for (cx, ch, size), sites in by_shape.items()
    ]


def _merge_duplicates(cases: Iterable[Case]) -> List[Case]:
    """One case per (shapes, dtype, filter); the later families are appended to the first one's list."""
    merged: Dict[Tuple, Case] = {}
    for case in cases:
        key = (case.x_shape, case.h_shape, case.dtype, case.threshold, case.mask)
        if key in merged:
            first = merged[key]
            merged[key] = replace(first, families=first.families + case.families,
                                  sites=f"{first.sites}; {case.family}: {case.sites}")
        else:
            merged[key] = case
    return list(merged.values())


def op_cases(dtypes: Sequence[torch.dtype], batches: Sequence[int] = (1, 2, 8),
             families: Optional[Sequence[str]] = None) -> List[Case]:
    """Every distinct decoder concat of the chosen families, for each batch size and dtype."""
    chosen = list(FAMILIES) if families is None else list(families)
    unknown = [key for key in chosen if key not in FAMILIES]
    if unknown:
        raise ValueError(f"families must be among {list(FAMILIES)}, got {unknown}")
    for batch in batches:
        if batch < 1:
            raise ValueError(f"batches must be >= 1, got {batch}")
    cases = [
        case
        for dtype in dtypes
        for batch in batches
        for key in chosen
        for case in _family_cases(FAMILIES[key], batch, dtype)
    ]
    return _merge_duplicates(cases)


# --quick: the two SDXL shapes the targets name, SDXL's mixed concat, SD 1.5's smallest plane (where
# per-call overhead dominates) and one video concat; batch 2 (classifier-free guidance).
_QUICK_PICKS = (
    ("sd15-512", 1280, 1280, 8),
    ("sdxl-1024", 1280, 1280, 32),
    ("sdxl-1024", 1280, 640, 32),
    ("sdxl-1024", 640, 640, 64),
    ("video-sd15-512-16f", 1280, 1280, 8),
)


def quick_op_cases(dtypes: Sequence[torch.dtype], batch: int = 2) -> List[Case]:
    """The short case list of ``--quick``: the picks above, taken from the derived cases."""
    everything = op_cases(dtypes, (batch,))
    picked = []
    for family, cx, ch, size in _QUICK_PICKS:
        picked += [c for c in everything
                   if family in c.families and c.x_shape[1] == cx and c.h_shape[1] == ch and c.x_shape[-1] == size]
    return picked


@dataclass(frozen=True)
class CrossoverCase:
    """Low-rank vs FFT: one skip shape and dtype, timed at every threshold for each mask kind."""

    x_shape: Tuple[int, ...]
    dtype: torch.dtype
    thresholds: Tuple[int, ...] = tuple(range(1, 17))
    masks: Tuple[str, ...] = ("box", "radial")
    title: str = ""

    def at(self, threshold: int, mask: str) -> Case:
        """The op-level case for one threshold and mask (x and h of the same shape)."""
        return Case(self.x_shape, self.x_shape, self.dtype, ("crossover",), self.title, threshold, mask)


def crossover_cases(dtypes: Sequence[torch.dtype], quick: bool = False) -> List[CrossoverCase]:
    """Plane sizes 32, 64 and 128 (SDXL's decoder planes at 1024 px); --quick: one 64x64 shape, fewer thresholds.

    The crossover depends on the plane size (FFT work grows like H W log(H W), the low-rank update like
    H W times the frequency count) and on the dtype (the torch backend splits low-precision operands).
    """
    if quick:
        thresholds = (1, 2, 4, 6, 8, 9, 12, 16)
        return [CrossoverCase((1, 320, 64, 64), dtype, thresholds, title="SDXL 64x64 plane, 320 channels")
                for dtype in dtypes]
    shapes = (
        ((2, 1280, 32, 32), "SDXL up0 plane"),
        ((2, 640, 64, 64), "SDXL up1 plane"),
        ((2, 320, 128, 128), "SDXL up2 plane"),
    )
    return [CrossoverCase(shape, dtype, title=title) for dtype in dtypes for shape, title in shapes]


def parse_dtypes(text: str) -> List[torch.dtype]:
    """'fp32,bf16' or 'float32,bfloat16' -> [torch.float32, torch.bfloat16]."""
    dtypes = []
    for item in (part.strip().lower() for part in text.split(",")):
        if not item:
            continue
        name = _DTYPE_ALIASES.get(item, item)
        if name not in DTYPES:
            raise ValueError(f"dtypes must be among {sorted(DTYPES) + sorted(_DTYPE_ALIASES)}, got {item!r}")
        dtypes.append(DTYPES[name])
    if not dtypes:
        raise ValueError(f"dtypes must name at least one dtype, got {text!r}")
    return dtypes


def select_cases(cases: Sequence[Case], patterns: Optional[Sequence[str]]) -> List[Case]:
    """Cases whose label or any family matches one of ``patterns`` (substring, or glob with * ? [])."""
    if not patterns:
        return list(cases)

    def matches(case: Case, pattern: str) -> bool:
        texts = (case.label,) + case.families
        if any(ch in pattern for ch in "*?["):
            return any(fnmatch.fnmatch(text, pattern) for text in texts)
        return any(pattern in text for text in texts)

    return [case for case in cases if any(matches(case, pattern) for pattern in patterns)]
