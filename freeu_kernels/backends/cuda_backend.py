"""The "cuda" backend: the CUDA C++ kernel of csrc/ (one launch writes the whole output), through ctypes.

Design: docs/design.md section 7 and csrc/README.md (phases, paths, register report).

The kernel lives in a plain shared library, ``freeu_kernels/_lib/libfreeu_kernels_cuda.so``, built by
setup.py with nvcc. It includes no torch header: one binary serves every torch and Python version, and
this module hands it raw pointers, sizes, int64 strides and the current CUDA stream through the C ABI of
``csrc/freeu_fused_concat.h`` (c_abi.py fills it). The launcher
allocates nothing and never synchronises, so a call can be captured in a CUDA graph; ``b`` and ``s``
given as device tensors are read by the kernel through their pointers, so a graph replay sees their
current values.

Memory formats (c_abi.py): for a channels_last output the kernel walks channels fastest, so x, h and the
output are all read and written with coalesced 16-byte vectors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..spec import FreeUSpec
from .c_abi import ABI_VERSION, KernelLibrary, launch, load_library

__all__ = ["load_error", "fused_concat_cuda", "library_path", "launch", "load_library", "ENV_LIBRARY",
           "ABI_VERSION"]

ENV_LIBRARY = "FREEU_KERNELS_CUDA_LIB"  # path of the shared library, overriding the packaged one
LIBRARY_NAME = "libfreeu_kernels_cuda.so"

_LIBRARY = KernelLibrary(LIBRARY_NAME, ENV_LIBRARY, "CUDA extension",
                         "build it on a machine with nvcc and a CUDA build of torch: pip install -e . "
                         "or python setup.py build_ext --inplace")


def library_path() -> Path:
    """Where the compiled kernel library is looked for ($FREEU_KERNELS_CUDA_LIB overrides)."""
    return _LIBRARY.path()


def load_error() -> Optional[str]:
    """None when the kernel library is loaded and a CUDA device is present, else the reason."""
    if torch.version.cuda is None:
        return "torch is a CPU-only build (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return _LIBRARY.load()[1]


_PREPARED = set()


def fused_concat_cuda(x: torch.Tensor, h: torch.Tensor, b: torch.Tensor, s: torch.Tensor, spec: FreeUSpec,
                      scale_map: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The registry kernel (registry.py contract): one launch of the CUDA kernel on the current stream."""
    lib = _LIBRARY.for_call(x, "cuda", "CUDA", "cuda")
    device = x.device
    with torch.cuda.device(device):
        if device.index not in _PREPARED and not torch.cuda.is_current_stream_capturing():
            # CUDA loads modules lazily at the first launch; do it here, outside any graph capture.
            code = lib.freeu_prepare()
            if code != 0:
                raise RuntimeError(f"loading the CUDA kernels failed: {lib.freeu_error_string(code).decode()}")
            _PREPARED.add(device.index)
        props = torch.cuda.get_device_properties(device)
        return launch(lib, x, h, b, s, spec, scale_map, stream=torch.cuda.current_stream(device).cuda_stream,
                      num_sms=props.multi_processor_count)
