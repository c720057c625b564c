"""The data the codegen report passes around: a case, one compiled role of a kernel, one compiled launch.

A *target* (bench/codegen/triton_target.py, bench/codegen/cuda_target.py) turns a :class:`CodegenCase` and an
architecture into a :class:`KernelBuild`: what the real launcher would launch for that case on a GPU, compiled
ahead of time, with the SASS of each code path ("role") it runs. The framework (sass.py, devices.py,
report.py) turns a KernelBuild into counted quantities and a model of the fraction of the copy ceiling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence, Tuple

import torch

__all__ = ["CodegenCase", "RoleCode", "KernelBuild", "DTYPES"]

# Short dtype names used in case names and rows -> torch dtypes.
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class CodegenCase:
    """One call of the op, described by shapes only: no tensor memory is ever allocated for it.

    ``x_shape`` and ``h_shape`` are logical (N, Cx, [F,] H, W) and (N, Ch, [F,] H, W); ``channels_last``
    lays both out as channels_last (4-D) or channels_last_3d (5-D), as a U-Net running in that memory
    format hands them to FreeU.
    """

    name: str
    x_shape: tuple
    h_shape: tuple
    dtype: str
    threshold: int = 1
    mask: str = "box"
    version: int = 1
    channels_last: bool = False

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if len(self.x_shape) not in (4, 5) or len(self.h_shape) != len(self.x_shape):
            raise ValueError(f"x_shape and h_shape must both be 4-D or 5-D, got {self.x_shape}, {self.h_shape}")
        if self.x_shape[0] != self.h_shape[0] or tuple(self.x_shape[2:]) != tuple(self.h_shape[2:]):
            raise ValueError(f"h_shape must match x_shape except in channels, got {self.x_shape}, {self.h_shape}")

    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of x, h and the output."""
        return DTYPES[self.dtype]

    def tensors(self, device="meta") -> Tuple[torch.Tensor, torch.Tensor]:
        """x and h with the case's shapes, dtype and memory format (on the meta device: no memory)."""
        fmt = torch.contiguous_format
        if self.channels_last:
            fmt = torch.channels_last if len(self.x_shape) == 4 else torch.channels_last_3d
        x = torch.empty(self.x_shape, dtype=self.torch_dtype(), device=device).contiguous(memory_format=fmt)
        h = torch.empty(self.h_shape, dtype=self.torch_dtype(), device=device).contiguous(memory_format=fmt)
        return x, h

    def spec(self):
        """``freeu_kernels.spec.make_spec`` on this case's tensors (the launchers' own description)."""
        from freeu_kernels.spec import make_spec

        x, h = self.tensors()
        return make_spec(x, h, threshold=self.threshold, version=self.version, mask=self.mask)

    @property
    def element_size(self) -> int:
        """Bytes per element of x, h and the output."""
        return torch.empty((), dtype=self.torch_dtype()).element_size()

    @property
    def output_elements(self) -> int:
        """Elements of the output, N (Cx + Ch) [F] H W."""
        return math.prod(self.x_shape) + math.prod(self.h_shape)

    @property
    def bytes_moved(self) -> int:
        """What torch.cat moves: every input element read once, every output element written once."""
        return 2 * self.output_elements * self.element_size


@dataclass
class RoleCode:
    """One code path of a launch, compiled as its own function so its SASS holds that path only.

    ``loop_trips`` gives, for each loop :func:`bench.codegen.sass.find_loops` finds in ``sass`` (sorted by
    start address), how many times its body runs per entry of the enclosing code (0 for a path the case
    never takes). ``elements_per_program`` is the output elements one program of this role writes, on
    average; programs x elements_per_program summed over the roles is the whole output.
    """

    role: str
    sass: str
    loop_trips: Sequence[float]
    programs: int
    threads_per_program: int
    elements_per_program: float
    note: str = ""


@dataclass
class KernelBuild:
    """One compiled launch of one backend for one case and architecture (sm_90 -> ``arch=90``).

    ``registers``/``spill_bytes`` come from ptxas for the kernel the launcher really launches (spills: the
    larger of the spill store and spill load bytes per thread); ``shared_bytes`` is the static plus dynamic
    shared memory one program requests, without the 1 KB the driver reserves per block (the occupancy model
    adds it). ``launch`` holds the grid, warps, constexprs / plan fields, shown in the report.
    """

    backend: str
    case: CodegenCase
    arch: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    threads_per_program: int
    compile_seconds: float
    roles: list
    launch: dict
    notes: list = field(default_factory=list)
