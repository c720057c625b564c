"""The C ABI shared by the compiled kernels (csrc/freeu_fused_concat.h): argument struct, loader, launcher.

The CUDA library (cuda_backend.py) and the host library (cpu_backend.py) export the same entry points
and take the same FreeuFusedConcatArgs; :class:`_Args` mirrors that struct field for field. ``launch``
fills it from tensors and calls the library: with device pointers and a CUDA stream for the CUDA one,
with host pointers for the CPU one (and for the CUDA kernel's CPU emulator in the tests).

Memory formats: the output follows x (spec.allocate_output). For a channels_last output the kernels walk
channels fastest ("channels_last" mode); an input whose fastest axis is not the mode's (say h contiguous
while x is channels_last, or a view with a strided last dimension) is first copied into the mode's
layout, which costs one extra read and write of that input. Every other stride pattern is handled by the
kernels themselves.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..spec import KERNEL_DTYPES, MAX_LOWRANK_FREQUENCIES_PER_AXIS, FreeUSpec, allocate_output, output_memory_format

__all__ = ["ABI_VERSION", "KernelLibrary", "PlanInfo", "bind_launch", "launch", "load_library"]


def _dtype_error(x: torch.Tensor, kernel: str) -> TypeError:
    return TypeError(f"x has dtype {x.dtype}; the {kernel} kernel computes float16, bfloat16 and float32 "
                     "(use backend='torch' for float64)")

ABI_VERSION = 1

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_MAX_AXIS = 1 << 30  # the kernel's bound on H and W (csrc: kMaxAxis)
_MAX_SPAN = 1 << 62  # the largest element offset the kernel forms


class _View(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("stride", ctypes.c_int64 * 5)]


class _Args(ctypes.Structure):
    """FreeuFusedConcatArgs of csrc/freeu_fused_concat.h, same fields, same order."""

    _fields_ = [
        ("abi_version", ctypes.c_int32),
        ("dtype", ctypes.c_int32),
        ("n", ctypes.c_int64),
        ("cx", ctypes.c_int64),
        ("ch", ctypes.c_int64),
        ("f", ctypes.c_int64),
        ("h", ctypes.c_int64),
        ("w", ctypes.c_int64),
        ("x", _View),
        ("skip", _View),
        ("out_x", _View),
        ("out_skip", _View),
        ("scale_map", ctypes.c_void_p),
        ("map_stride", ctypes.c_int64 * 4),
        ("window_start", ctypes.c_int64),
        ("window_stop", ctypes.c_int64),
        ("b_ptr", ctypes.c_void_p),
        ("s_ptr", ctypes.c_void_p),
        ("b_value", ctypes.c_double),
        ("s_value", ctypes.c_double),
        ("high_gain", ctypes.c_double),
        ("b_is_f64", ctypes.c_int32),
        ("s_is_f64", ctypes.c_int32),
        ("version", ctypes.c_int32),
        ("ky0", ctypes.c_int32),
        ("ny", ctypes.c_int32),
        ("kx0", ctypes.c_int32),
        ("nx", ctypes.c_int32),
        ("radial", ctypes.c_int32),
        ("radius_sq", ctypes.c_int64),
        ("channels_last", ctypes.c_int32),
        ("num_sms", ctypes.c_int32),
    ]


class PlanInfo(ctypes.Structure):
    """FreeuPlanInfo of csrc/freeu_fused_concat.h: the launch freeu_plan(args) reports (CUDA kernel only)."""

    _fields_ = [(name, ctypes.c_int32) for name in ("skip_path", "backbone_path")] + [
        ("skip_blocks", ctypes.c_int64), ("backbone_blocks", ctypes.c_int64)] + [
        (name, ctypes.c_int32) for name in (
            "threads", "smem_bytes", "skip_vec", "backbone_vec", "skip_planes_per_block", "tile_lanes",
            "tile_threads_per_plane", "lanes_row", "lanes_col", "use_tab", "tile_rows", "skip_task_vecs",
            "backbone_task_vecs", "ny", "nx", "version", "channels_last")]

    PATHS = {0: "none", 1: "flat", 2: "planes", 3: "tile", 4: "on_chip", 5: "two_sweep",
             6: "cl_vectors"}  # FREEU_PATH_*


def load_library(path) -> ctypes.CDLL:
    """Opens a library with the freeu C ABI (CUDA, CPU, or the CUDA kernel's CPU emulator) and checks it."""
    lib = ctypes.CDLL(str(path))
    lib.freeu_abi_version.restype = ctypes.c_int
    lib.freeu_args_size.restype = ctypes.c_int64
    lib.freeu_fused_concat.restype = ctypes.c_int
    lib.freeu_fused_concat.argtypes = [ctypes.POINTER(_Args), ctypes.c_void_p]
    lib.freeu_prepare.restype = ctypes.c_int
    lib.freeu_error_string.restype = ctypes.c_char_p
    lib.freeu_error_string.argtypes = [ctypes.c_int]
    lib.freeu_kernel_info.restype = ctypes.c_int
    lib.freeu_kernel_info.argtypes = [ctypes.c_int32] + [ctypes.POINTER(ctypes.c_int32)] * 3
    if hasattr(lib, "freeu_plan"):  # the CUDA kernel's host-side planner (not in the CPU library)
        lib.freeu_plan.restype = ctypes.c_int
        lib.freeu_plan.argtypes = [ctypes.POINTER(_Args), ctypes.POINTER(PlanInfo)]
    version, size = lib.freeu_abi_version(), lib.freeu_args_size()
    if version != ABI_VERSION or size != ctypes.sizeof(_Args):
        raise OSError(
            f"{path} has ABI version {version} and argument size {size}; this package expects "
            f"{ABI_VERSION} and {ctypes.sizeof(_Args)} (rebuild it: pip install -e . or python setup.py build_ext --inplace)"
        )
    return lib


def _view(t: torch.Tensor) -> _View:
    """(N, C, F, H, W) element strides of a 4-D or 5-D tensor; a dimension of size 1 gets stride 0."""
    sizes = list(t.shape)
    strides = list(t.stride())
    if t.dim() == 4:
        sizes.insert(2, 1)
        strides.insert(2, 0)
    strides = [0 if size == 1 else stride for size, stride in zip(sizes, strides)]
    return _View(t.data_ptr(), (ctypes.c_int64 * 5)(*strides))


def _span(t: torch.Tensor) -> int:
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()) if size > 0)


def _mode_layout(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """t, or a copy of it whose fastest axis is the one the kernel vectorises in this mode."""
    if fmt == torch.contiguous_format:
        fastest_ok = t.shape[-1] == 1 or t.stride(-1) == 1
    else:
        fastest_ok = t.shape[1] == 1 or t.stride(1) == 1
    return t if fastest_ok else t.contiguous(memory_format=fmt)


def _check_sizes(spec: FreeUSpec, tensors, kernel: str) -> None:
    if spec.height > _MAX_AXIS or spec.width > _MAX_AXIS:
        raise ValueError(
            f"x: planes of {spec.height} x {spec.width} exceed the {kernel} kernel's 2^30 per axis; use backend='torch'"
        )
    if spec.uses_fft_fallback:
        raise ValueError(
            f"threshold={spec.threshold}: {spec.band.ny} x {spec.band.nx} frequencies exceed the kernel's "
            f"{MAX_LOWRANK_FREQUENCIES_PER_AXIS} per axis (the op routes such masks to the torch FFT path)"
        )
    for name, t in tensors:
        if any(stride < 0 for stride in t.stride()) or _span(t) >= _MAX_SPAN:
            raise ValueError(f"{name}: strides {tuple(t.stride())} exceed the kernel's int64 addressing")


class _LaunchPlan:
    """One bound launch: what every call with one (spec, strides, mode) key needs, computed once, and the
    call itself (:meth:`run`).

    Computed here: the checks' verdict (dtype, sizes, addressing), whether an input must be copied into
    the mode's layout, the output's shape and strides, and the argument struct with every field but the
    data pointers, factors and thread count filled in (as bytes, copied per call so concurrent calls
    never share one). The library is bound too: a call then only allocates, fills pointers and calls.
    """

    __slots__ = ("lib", "kernel", "fmt", "template", "skip_offset", "copy_x", "copy_h", "out_empty", "skip_channels",
                 "map_needed", "map_sizes", "factors_by_pointer", "device")

    def __init__(self, lib: ctypes.CDLL, x, h, spec: FreeUSpec, num_sms: int, kernel: str,
                 factors_by_pointer: bool = False, host_library: bool = False):
        if x.dtype not in _DTYPE_CODES:
            raise _dtype_error(x, kernel)
        _check_sizes(spec, [("x", x), ("h", h)], kernel)
        self.lib, self.kernel, self.device = lib, kernel, x.device
        # A host library reads a CPU factor through its pointer (no .item()); a device library reads CPU
        # factors by value (unless told to: the emulator reads host memory) and device ones by pointer.
        self.factors_by_pointer = factors_by_pointer or host_library
        # Layouts only, on meta twins of the inputs: no output is allocated and no input copied here
        # (allocate_output and the layout copies are deterministic in the strides, and a meta tensor's
        # data_ptr is its byte offset, so the skip half's offset comes out the same).
        x, h = (torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta") for t in (x, h))
        out = allocate_output(x, spec.skip_channels)
        self.skip_channels = spec.skip_channels
        self.out_empty = out.numel() == 0
        self.fmt = fmt = output_memory_format(x)
        x_in, h_in = _mode_layout(x, fmt), _mode_layout(h, fmt)
        self.copy_x, self.copy_h = x_in is not x, h_in is not h
        cx = spec.backbone_channels_total
        out_x, out_h = out[:, :cx], out[:, cx:]
        _check_sizes(spec, [("out", out)], kernel)
        self.skip_offset = (out_h.data_ptr() - out.data_ptr()) if out.numel() else 0
        start, stop = spec.window
        self.map_needed = spec.version == 2 and stop > start and cx > 0
        self.map_sizes = [spec.batch, spec.frames, spec.height, spec.width]
        band = spec.band
        args = _Args(
            abi_version=ABI_VERSION,
            dtype=_DTYPE_CODES[x.dtype],
            n=spec.batch, cx=cx, ch=spec.skip_channels, f=spec.frames, h=spec.height, w=spec.width,
            x=_view(x_in), skip=_view(h_in), out_x=_view(out_x), out_skip=_view(out_h),
            scale_map=None, map_stride=(ctypes.c_int64 * 4)(0, 0, 0, 0),
            window_start=start, window_stop=stop,
            b_ptr=None, s_ptr=None, b_value=0.0, s_value=0.0, high_gain=float(spec.high_gain),
            b_is_f64=0, s_is_f64=0, version=spec.version,
            ky0=band.ky0, ny=band.ny, kx0=band.kx0, nx=band.nx,
            radial=int(band.radial), radius_sq=band.radius_sq or 0,
            channels_last=int(fmt != torch.contiguous_format), num_sms=int(num_sms),
        )
        self.template = bytes(args)

    def _factor(self, name: str, value: torch.Tensor):
        """(pointer or None, is_float64, host value, keep-alive) for b or s."""
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            raise ValueError(f"{name} must be a 0-d tensor, got {type(value).__name__}")
        on_host = value.is_cpu
        if on_host and not self.factors_by_pointer:
            return None, 0, float(value), None  # host value for a device kernel: no access, no sync
        if not on_host and value.device != self.device:
            raise ValueError(f"{name} must be on the CPU or on {self.device}, got {value.device}")
        dtype = value.dtype
        if dtype is not torch.float32 and dtype is not torch.float64:
            value = value.to(torch.float32)  # stream-ordered device op; kept alive until the launch is queued
        return value.data_ptr(), int(dtype is torch.float64), 0.0, value

    def run(self, x: torch.Tensor, h: torch.Tensor, b: torch.Tensor, s: torch.Tensor,
            scale_map: Optional[torch.Tensor] = None, *, stream: int = 0, num_sms: Optional[int] = None
            ) -> torch.Tensor:
        """One call for x, h of this plan's key: allocate the output, fill the struct, call the library.

        ``num_sms`` overrides the thread count packed in the plan (the CPU library follows
        torch.get_num_threads per call). Raises ValueError for arguments the kernel rejects, RuntimeError
        for a CUDA error.
        """
        out = allocate_output(x, self.skip_channels)  # per call (the tests' NaN-poisoned buffers replace it)
        if self.out_empty:
            return out
        x_in = x.contiguous(memory_format=self.fmt) if self.copy_x else x
        h_in = h.contiguous(memory_format=self.fmt) if self.copy_h else h
        args = _Args.from_buffer_copy(self.template)
        args.x.data, args.skip.data = x_in.data_ptr(), h_in.data_ptr()
        args.out_x.data = out_ptr = out.data_ptr()
        args.out_skip.data = out_ptr + self.skip_offset
        if num_sms is not None:
            args.num_sms = num_sms
        args.b_ptr, args.b_is_f64, args.b_value, b_keep = self._factor("b", b)
        args.s_ptr, args.s_is_f64, args.s_value, s_keep = self._factor("s", s)
        map_keep = None
        if self.map_needed:
            if scale_map is None:
                raise ValueError("scale_map must be given for version 2 (the op computes it from x)")
            map_keep = scale_map.to(device=x.device, dtype=torch.float32)
            sizes, strides = list(map_keep.shape), list(map_keep.stride())
            if map_keep.dim() == 3:
                sizes.insert(1, 1)
                strides.insert(1, 0)
            if sizes != self.map_sizes:
                raise ValueError(f"scale_map must have shape (N, [F,] H, W), got {tuple(map_keep.shape)}")
            args.scale_map = map_keep.data_ptr()
            args.map_stride = (ctypes.c_int64 * 4)(*[0 if n == 1 else st for n, st in zip(sizes, strides)])

        code = self.lib.freeu_fused_concat(ctypes.byref(args), stream or None)
        del b_keep, s_keep, map_keep  # freed after queueing: the caching allocator orders reuse on this stream
        if code != 0:
            message = self.lib.freeu_error_string(code).decode(errors="replace")
            if code < 0:
                raise ValueError(f"the {self.kernel} kernel rejected its arguments: {message} (code {code})")
            raise RuntimeError(f"the {self.kernel} kernel failed to launch: {message} (cudaError {code})")
        return out


_PLANS: dict = {}


def bind_launch(lib: ctypes.CDLL, x: torch.Tensor, h: torch.Tensor, spec: FreeUSpec, *, num_sms: int = 0,
                factors_by_pointer: bool = False, host_library: bool = False, kernel: str = "CUDA") -> _LaunchPlan:
    """The launch of ``lib`` for every call with x's and h's strides and this spec, checked and packed once.

    Cached per (library, spec, strides, device, num_sms, options); :meth:`_LaunchPlan.run` is the call. Raises
    TypeError for a dtype the kernel does not compute and ValueError for sizes or strides it cannot
    address, here, before anything is cached.
    """
    key = (id(lib), spec, x.stride(), h.stride(), x.device, num_sms, factors_by_pointer, host_library, kernel)
    plan = _PLANS.get(key)
    if plan is None or plan.lib is not lib:
        plan = _LaunchPlan(lib, x, h, spec, num_sms, kernel, factors_by_pointer, host_library)
        if len(_PLANS) >= 4096:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def launch(lib: ctypes.CDLL, x: torch.Tensor, h: torch.Tensor, b: torch.Tensor, s: torch.Tensor, spec: FreeUSpec,
           scale_map: Optional[torch.Tensor] = None, *, stream: int = 0, num_sms: int = 0,
           factors_by_pointer: bool = False, host_library: bool = False, kernel: str = "CUDA") -> torch.Tensor:
    """Fills the C arguments from the tensors and runs ``freeu_fused_concat`` of ``lib`` on ``stream``.

    Device-agnostic on purpose: with a host library (the CPU kernel, or the CUDA kernel's emulator in the
    tests) the same code runs on CPU tensors. ``num_sms`` is the device's multiprocessor count for the
    CUDA library and the number of threads for the CPU one; ``kernel`` names the library in messages;
    ``factors_by_pointer`` passes CPU factors by pointer to a device library (the emulator reads host
    memory), ``host_library`` says the library runs on the host (it reads CPU factors by pointer).
    Raises TypeError for a dtype the kernel does not compute, ValueError for arguments it cannot address,
    RuntimeError for a CUDA error. Everything but the pointers and factors is packed once per key
    (bind_launch); a call then fills a copy of that struct.
    """
    plan = bind_launch(lib, x, h, spec, num_sms=num_sms, factors_by_pointer=factors_by_pointer,
                       host_library=host_library, kernel=kernel)
    return plan.run(x, h, b, s, scale_map, stream=stream)


class KernelLibrary:
    """One packaged kernel library: where it is ($ENV overrides), loaded once, or why it cannot be."""

    def __init__(self, file_name: str, env_override: str, what: str, build_hint: str):
        self.file_name, self.env_override, self.what, self.build_hint = file_name, env_override, what, build_hint

    def path(self) -> Path:
        """Where the library is looked for: $env_override, else freeu_kernels/_lib/<file_name>."""
        override = os.environ.get(self.env_override)
        if override:
            return Path(override)
        return Path(__file__).resolve().parent.parent / "_lib" / self.file_name

    def for_call(self, x: torch.Tensor, device_type: str, kernel: str, backend: str) -> ctypes.CDLL:
        """The loaded library for a call on x; TypeError/ValueError for an input it does not take."""
        if x.dtype not in KERNEL_DTYPES:
            raise _dtype_error(x, kernel)
        if x.device.type != device_type:
            raise ValueError(f"x must be a {device_type.upper()} tensor for the {backend} backend, got device {x.device}")
        lib, error = self.load()
        if lib is None:
            raise RuntimeError(error)
        return lib

    @functools.lru_cache(maxsize=None)
    def load(self) -> Tuple[Optional[ctypes.CDLL], Optional[str]]:
        """(library, None) once loaded and checked, else (None, the reason)."""
        path = self.path()
        if not path.exists():
            return None, f"the {self.what} was not built (no {path}; {self.build_hint})"
        try:
            return load_library(path), None
        except OSError as exc:
            return None, f"the {self.what} could not be loaded: {exc}"
