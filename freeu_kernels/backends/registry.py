"""Which backends exist, which can run on a device, and the kernel function of each.

Every kernel has one signature: ``kernel(x, h, b, s, spec, scale_map) -> out`` with b, s 0-d float32
(float64 for float64 inputs) tensors, ``spec`` the validated :class:`~freeu_kernels.spec.FreeUSpec`, and
``scale_map`` the version-2 scale ``(b - 1) m^ + 1`` of shape (N, [F,] H, W) or None for version 1.
Each backend also has a binder, ``bind(spec, x, h) -> run``: ``run(x, h, b, s, scale_map) -> out`` is the
kernel for every call whose x and h have the given ones' shapes, strides, dtype and device, with all the
work that depends only on those (checks, launch plans, tables, argument packing) done once in bind. The
op caches one runner per such key (ops._CallPlan), so a repeated call costs the runner alone.
Kernel modules are imported on first use, so importing the package never needs Triton or the extension.
"""

from __future__ import annotations

import importlib
import os
import platform
from typing import Callable, Optional

import torch

from ..spec import KERNEL_DTYPES

# Automatic choice on CUDA tensors, best first. Triton leads because it is the backend CI exercises on
# every submission (through its interpreter); the CUDA C++ kernel follows until GPU measurements in
# bench/results/ show it ahead. On CPU tensors the fused C++ kernel leads when it was built, where it
# was measured ahead of the torch backend (suits(), _cpu_kernel_wins: per kernel copy and plane width,
# on x86-64 only); the Triton interpreter is for tests, not for speed. Elsewhere (MPS, ...) "auto" is the torch
# backend. The fused kernels compute float16, bfloat16 and float32 only; the automatic choice passes
# them over for other dtypes (suits()).
CUDA_PREFERENCE = ("triton", "cuda", "torch")
CPU_PREFERENCE = ("cpu", "torch")
# Every backend, in the order available_backends lists the ones outside the automatic choice.
PREFERENCE_ORDER = ("torch", "cpu", "triton", "cuda")

# name -> (module, kernel function, binder).
_MODULES = {
    "torch": ("freeu_kernels.backends.torch_backend", "fused_concat_torch", "bind_torch"),
    "cpu": ("freeu_kernels.backends.cpu_backend", "fused_concat_cpu", "bind_cpu"),
    "triton": ("freeu_kernels.backends.triton_backend", "fused_concat_triton", "bind_triton"),
    "cuda": ("freeu_kernels.backends.cuda_backend", "fused_concat_cuda", "bind_cuda"),
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


# When the automatic choice takes the fused CPU kernel. Measured 2026-12-01 on an Intel Sapphire Rapids
# (AVX-512; 2 vCPUs shared with other jobs, torch 2.13, 1 thread, medians of interleaved calls timed by
# thread CPU time; the x86-64-v3 (AVX2) and baseline (SSE2) copies forced with FREEU_KERNELS_CPU_ISA on
# that processor, not run on an AVX2-only one), time of the cpu kernel / time of the torch backend:
#   SDXL (2,1280,32,32) and (2,640,64,64), fp32 and bf16: v4 0.15-0.80, v3 0.15-0.81, baseline 0.22-0.87
#     (the kernel at 1.2-1.5x torch.cat with either copy, the torch backend at 1.5-9.9x);
#   contiguous 8x8:   v4 1.7-1.8 (half of each 16-lane vector idle), v3 0.60-0.78, baseline 0.59-0.78;
#   contiguous 12x12: v4 1.2-1.9, v3 1.0-1.1 (a 4-column tail per row), baseline 0.54-0.67;
#   contiguous 16x16, 24x24: every copy 0.21-0.74; channels_last 8x8 to 24x24: every copy 0.11-0.56.
# The kernel runs rows narrower than 16 on the widest copy whose vector divides them (freeu_cpu.cpp
# chosen_copy: v3 for 8, the baseline for 4 and 12), where it measured 0.55-0.78 at 8x8 and 12x12; a width
# that no vector divides (10x10: 1.1-1.2) stays slower. Hence: the kernel for channels_last inputs, planes
# at least CPU_KERNEL_MIN_WIDTH wide, or a multiple of 4 wide; the torch backend for other narrow planes.
# The baseline copy is the only one on processors other than x86-64 (ARM, Apple): GCC vectorises it for
# their 128-bit SIMD, but it has never been built or measured there, so "auto" takes the torch backend on
# them (backend="cpu" still runs the kernel).
# (Before, 2026-11-21, on a 2-vCPU AMD EPYC, AVX2 only: the x86-64-v3 copy, then built with 16-lane
# vectors that GCC lowered through the stack, ran 2-3x slower than the torch backend in bf16; fixed.)
CPU_KERNEL_MIN_WIDTH = 16
CPU_KERNEL_NARROW_MULTIPLE = 4  # the baseline copy's vector: narrower rows that it divides still win
# Whether this is a processor family the CPU measurements above cover.
CPU_KERNEL_MEASURED_HERE = platform.machine().lower() in ("x86_64", "amd64")


def _cpu_kernel_wins(spec, channels_last: bool) -> bool:
    """Whether the fused CPU kernel beats the torch backend on this call (the measurements above)."""
    if not CPU_KERNEL_MEASURED_HERE:
        return False
    return channels_last or spec.width >= CPU_KERNEL_MIN_WIDTH or spec.width % CPU_KERNEL_NARROW_MULTIPLE == 0


def suits(name: str, spec, channels_last: bool = False) -> bool:
    """Whether the automatic choice should use backend ``name`` for this call (``spec`` may be None)."""
    if name == "torch" or spec is None:
        return True
    if spec.dtype not in KERNEL_DTYPES:  # the fused kernels compute float16, bfloat16 and float32
        return False
    return name != "cpu" or _cpu_kernel_wins(spec, channels_last)


def auto_order(device: torch.device):
    """Backends the automatic choice tries for this device, best first."""
    if device.type == "cuda":
        return CUDA_PREFERENCE
    return CPU_PREFERENCE if device.type == "cpu" else ("torch",)


def kernel(name: str) -> Callable:
    """The kernel function of backend ``name`` (imports its module on first use)."""
    module_name, attr, _ = _MODULES[name]
    return getattr(importlib.import_module(module_name), attr)


def bind(name: str, spec, x: torch.Tensor, h: torch.Tensor) -> Callable:
    """Backend ``name``'s runner for calls shaped like (x, h): ``run(x, h, b, s, scale_map) -> out``.

    Raises what the kernel would raise for such a call (TypeError for a dtype it does not compute,
    ValueError for sizes or strides it cannot address), before anything is cached.
    """
    module_name, _, binder = _MODULES[name]
    return getattr(importlib.import_module(module_name), binder)(spec, x, h)
