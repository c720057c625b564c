"""The "cpu" backend: the fused C++ kernel of csrc/freeu_cpu.cpp on host threads, through ctypes.

Design: docs/design.md section 7 and csrc/README.md (its CPU section).

It is the CUDA kernel's C ABI (csrc/freeu_fused_concat.h, filled by c_abi.launch) implemented for the
host: one call writes the whole output, each input element is read once and each output element written
once, with the skip plane held in a float32 buffer between its moments and its update. It exists because
the pure-PyTorch backend cannot be that: on the CPU, torch.cat of bfloat16 is a memory copy, and any
chain of PyTorch ops that filters the skip tensor makes several full passes with kernels slower than a
copy (bench/results/cpu/report.md has both side by side).

The library, ``freeu_kernels/_lib/libfreeu_kernels_cpu.so``, is built by setup.py with the system C++
compiler (g++ or clang++, C++17 with _Float16); $FREEU_KERNELS_CPU_LIB points at another build. Threads:
``torch.get_num_threads()``, so ``torch.set_num_threads`` governs this backend like PyTorch's own CPU ops;
the work runs in torch's own OpenMP team when its runtime is loaded (no second pool competing with
torch's spinning threads for the cores), else in threads the kernel starts per call
($FREEU_KERNELS_CPU_POOL=threads forces those).
Planes whose rows are contiguous take the vectorised column-strip path. channels_last inputs (planes
strided by the channel count) are vectorised across channels instead, blocks of one vector of channels
(two for bfloat16) per work item, for bands of 1 or 2 frequencies per axis; other bands and stride
patterns go through the kernel's row path, correctly, more slowly. Contiguous rows narrower than 16
columns run the widest copy whose vector divides them (8: AVX2, 4 and 12: the baseline); the automatic
choice sends narrow widths that no vector divides to the torch backend (registry.py, with the
measurements).
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from ..spec import FreeUSpec
from .c_abi import KernelLibrary, bind_launch

__all__ = ["ENV_ISA", "ENV_LIBRARY", "LIBRARY_NAME", "bind_cpu", "fused_concat_cpu", "isa", "library_path",
           "load_error"]

ENV_LIBRARY = "FREEU_KERNELS_CPU_LIB"  # path of the shared library, overriding the packaged one
# The library carries the kernels compiled for x86-64-v4 (AVX-512, 16 float lanes per vector), x86-64-v3
# (AVX2, 8) and the baseline (SSE2 on x86-64, 4; the only copy elsewhere) and runs the widest the
# processor has (contiguous rows narrower than 16: the widest whose vector divides them); this variable
# names one copy for every call (the tests run each).
ENV_ISA = "FREEU_KERNELS_CPU_ISA"
LIBRARY_NAME = "libfreeu_kernels_cpu.so"

_LIBRARY = KernelLibrary(LIBRARY_NAME, ENV_LIBRARY, "CPU kernel library",
                         "build it with a C++17 compiler that has _Float16 (g++ >= 12 or clang++ >= 15): "
                         "pip install -e . or python setup.py build_ext --inplace")


def library_path():
    """Where the compiled kernel library is looked for ($FREEU_KERNELS_CPU_LIB overrides)."""
    return _LIBRARY.path()


def load_error() -> Optional[str]:
    """None when the CPU kernel library is loaded, else the reason it is not."""
    return _LIBRARY.load()[1]


def isa() -> Optional[str]:
    """The kernel copy calls run now ("x86-64-v4", "x86-64-v3" or "baseline"), or None without the library."""
    lib = _LIBRARY.load()[0]
    if lib is None:
        return None
    lib.freeu_cpu_isa.restype = ctypes.c_char_p
    return lib.freeu_cpu_isa().decode()


def bind_cpu(spec: FreeUSpec, x: torch.Tensor, h: torch.Tensor):
    """The kernel bound to x's and h's shapes and strides (registry.bind contract): a function
    ``run(x, h, b, s, scale_map) -> out`` for every call with those, checked and packed once.

    Per call it allocates the output, fills the data pointers (b and s are read through theirs: no
    .item()) and torch's current thread count, and makes one ctypes call.
    """
    lib = _LIBRARY.for_call(x, "cpu", "CPU", "cpu")
    plan = bind_launch(lib, x, h, spec, num_sms=torch.get_num_threads(), host_library=True, kernel="CPU")
    run_plan, num_threads = plan.run, torch.get_num_threads

    def run(x, h, b, s, scale_map=None):
        return run_plan(x, h, b, s, scale_map, num_sms=num_threads())

    return run


def fused_concat_cpu(x: torch.Tensor, h: torch.Tensor, b: torch.Tensor, s: torch.Tensor, spec: FreeUSpec,
                     scale_map: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The registry kernel (registry.py contract): one call of the CPU kernel on torch's thread count."""
    return bind_cpu(spec, x, h)(x, h, b, s, scale_map)
