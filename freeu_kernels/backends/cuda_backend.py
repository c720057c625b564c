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
from .c_abi import ABI_VERSION, KernelLibrary, bind_launch, launch, load_library

__all__ = ["load_error", "bind_cuda", "fused_concat_cuda", "library_path", "launch", "load_library", "ENV_LIBRARY",
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
_MULTIPROCESSORS = {}  # device index -> multiprocessor count (a device property: read once)
# The current stream's cudaStream_t without building a torch.cuda.Stream object per call (what
# torch.cuda.current_stream(device).cuda_stream returns; the private binding is the one Inductor's
# generated launchers use, and the public form is the fallback where a torch build lacks it).
_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _current_raw_stream(index: int) -> int:
    if _RAW_STREAM is not None:
        return _RAW_STREAM(index)
    return torch.cuda.current_stream(index).cuda_stream


def _prepare(lib, device: torch.device) -> int:
    """Loads the kernels on ``device`` once (outside any graph capture); its multiprocessor count."""
    with torch.cuda.device(device):
        if device.index not in _PREPARED and not torch.cuda.is_current_stream_capturing():
            # CUDA loads modules lazily at the first launch; do it here, outside any graph capture.
            code = lib.freeu_prepare()
            if code != 0:
                raise RuntimeError(f"loading the CUDA kernels failed: {lib.freeu_error_string(code).decode()}")
            _PREPARED.add(device.index)
    count = _MULTIPROCESSORS.get(device.index)
    if count is None:
        count = _MULTIPROCESSORS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return count


def bind_cuda(spec: FreeUSpec, x: torch.Tensor, h: torch.Tensor):
    """The kernel bound to x's and h's shapes, strides and device (registry.bind contract): a function
    ``run(x, h, b, s, scale_map) -> out``, checked and packed once; a call queues one launch on the
    current stream of x's device."""
    lib = _LIBRARY.for_call(x, "cuda", "CUDA", "cuda")
    device = x.device
    plan = bind_launch(lib, x, h, spec, num_sms=_prepare(lib, device), kernel="CUDA")

    index = device.index

    def run(x, h, b, s, scale_map=None):
        if index not in _PREPARED:  # bound during a capture: load the module at the first eager call
            _prepare(lib, device)
        if torch.cuda.current_device() == index:  # the common case: no device switch around the launch
            return plan.run(x, h, b, s, scale_map, stream=_current_raw_stream(index))
        with torch.cuda.device(device):
            return plan.run(x, h, b, s, scale_map, stream=_current_raw_stream(index))

    return run


def fused_concat_cuda(x: torch.Tensor, h: torch.Tensor, b: torch.Tensor, s: torch.Tensor, spec: FreeUSpec,
                      scale_map: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The registry kernel (registry.py contract): one launch of the CUDA kernel on the current stream."""
    return bind_cuda(spec, x, h)(x, h, b, s, scale_map)
