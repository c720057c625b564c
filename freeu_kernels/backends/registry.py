"""Which backends exist, which can run on a device, and the kernel function of each.

Every kernel has one signature: ``kernel(x, h, b, s, spec, scale_map) -> out`` with b, s 0-d float32
(float64 for float64 inputs) tensors, ``spec`` the validated :class:`~freeu_kernels.spec.FreeUSpec`, and
``scale_map`` the version-2 scale ``(b - 1) m^ + 1`` of shape (N, [F,] H, W) or None for version 1.
Kernel modules are imported on first use, so importing the package never needs Triton or the extension.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable, Optional

import torch

from ..spec import KERNEL_DTYPES

# Automatic choice on CUDA tensors, best first. Triton leads because it is the backend CI exercises on
# every submission (through its interpreter); the CUDA C++ kernel follows until GPU measurements in
# bench/results/ show it ahead. On CPU tensors the fused C++ kernel leads when it was built (measured
# ahead of the torch backend in bench/results/cpu/), for channels_last inputs or planes at least
# CPU_KERNEL_MIN_WIDTH wide (suits()); the Triton interpreter is for tests, not for speed. Elsewhere (MPS, ...) "auto" is the torch
# backend. The fused kernels compute float16, bfloat16 and float32 only; the automatic choice passes
# them over for other dtypes (suits()).
CUDA_PREFERENCE = ("triton", "cuda", "torch")
CPU_PREFERENCE = ("cpu", "torch")
# Every backend, in the order available_backends lists the ones outside the automatic choice.
PREFERENCE_ORDER = ("torch", "cpu", "triton", "cuda")

_MODULES = {
    "torch": ("freeu_kernels.backends.torch_backend", "fused_concat_torch"),
    "cpu": ("freeu_kernels.backends.cpu_backend", "fused_concat_cpu"),
    "triton": ("freeu_kernels.backends.triton_backend", "fused_concat_triton"),
    "cuda": ("freeu_kernels.backends.cuda_backend", "fused_concat_cuda"),
}


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels then run on CPU tensors, in Python."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def why_unavailable(name: str, device: torch.device) -> Optional[str]:
    """None if backend ``name`` can run on ``device``, else the reason."""
    if name == "torch":
        return None
    if name == "triton":
        try:
            importlib.import_module("triton")
        except ImportError:
            return "triton is not installed"
        if device.type == "cuda" or (device.type == "cpu" and interpreter_enabled()):
            return None
        return "Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1"
    if name == "cpu":
        if device.type != "cpu":
            return "the CPU C++ kernel runs on CPU tensors only"
        from . import cpu_backend

        return cpu_backend.load_error()
    if name == "cuda":
        if device.type != "cuda":
            return "the CUDA C++ kernel runs on CUDA tensors only"
        from . import cuda_backend

        return cuda_backend.load_error()
    return f"unknown backend {name!r}"


def is_available(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` can run on ``device`` (the automatic choice is auto_order's business)."""
    return why_unavailable(name, device) is None


# The fused CPU kernel vectorises contiguous planes along W in strips of 16 columns; narrower planes
# (SD 1.5's 8x8, 12x12) waste lanes and run 1.4x to 2x slower than the torch backend's Kronecker GEMMs,
# wider ones (16x16 and up) 1.1x to 3x faster. channels_last inputs are vectorised across channels
# instead, and there the kernel is 2x to 9x faster than the torch backend at every width from 16 up and
# in bfloat16 at 8x8 too (within 15% of it for float32 8x8). Measured on a 2-vCPU EPYC.
CPU_KERNEL_MIN_WIDTH = 16


def suits(name: str, spec, channels_last: bool = False) -> bool:
    """Whether the automatic choice should use backend ``name`` for this call (``spec`` may be None)."""
    if name == "torch" or spec is None:
        return True
    if spec.dtype not in KERNEL_DTYPES:  # the fused kernels compute float16, bfloat16 and float32
        return False
    return name != "cpu" or channels_last or spec.width >= CPU_KERNEL_MIN_WIDTH


def auto_order(device: torch.device):
    """Backends the automatic choice tries for this device, best first."""
    if device.type == "cuda":
        return CUDA_PREFERENCE
    return CPU_PREFERENCE if device.type == "cpu" else ("torch",)


def kernel(name: str) -> Callable:
    """The kernel function of backend ``name`` (imports its module on first use)."""
    module_name, attr = _MODULES[name]
    return getattr(importlib.import_module(module_name), attr)
