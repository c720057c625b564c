"""``torch.ops.freeu.fused_concat``: one schema, its fake, its autograd and the backend choice, in one place.

The schema is defined in Python (torch.library.custom_op); backends only supply kernels. The op is
opaque to torch.compile (the fake gives the compiler the output's shape, dtype and strides), so a
compiled U-Net keeps one node per concat, and ``b``/``s`` stay tensors: a FreeU schedule that changes
them every step neither recompiles nor gets baked into a CUDA graph.

Autograd (the filter is linear and self-adjoint): for an output gradient g,
    grad_h = filter(g[:, Cx:])                      Re(F^-1 diag(G) F) is symmetric for real gains G
    grad_x = g[:, :Cx] * scale                      version 1: scale = b on the window, 1 elsewhere
so version 1's backward is the op itself applied to g, and saves no tensor. Version 2's scale depends on
x through the mean map and its min/max; its backward recomputes that small map under autograd.
Gradients do not flow to b and s (they are schedule constants, not parameters).
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence

import torch

from .backends import registry
from .reference import structure_map
from .spec import Backend, FreeUSpec, allocate_output, check_factor, make_spec, output_memory_format

__all__ = ["fused_concat", "available_backends", "resolve_backend", "ENV_BACKEND"]

ENV_BACKEND = "FREEU_KERNELS_BACKEND"


def available_backends(device: Optional[torch.device | str] = None) -> List[str]:
    """Names of the backends that can run here, best first for ``device`` (default: cuda if present).

    "torch" runs everywhere. "cpu" needs the compiled CPU kernel library and CPU tensors. "triton" needs
    Triton and a CUDA device (or TRITON_INTERPRET=1, which runs its kernels on CPU tensors). "cuda" needs
    the compiled extension and a CUDA device.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    preferred = registry.auto_order(device)
    order = list(preferred) + [name for name in registry.PREFERENCE_ORDER if name not in preferred]
    return [name for name in order if registry.is_available(name, device)]


def resolve_backend(requested: Optional[str], device: torch.device, spec: Optional[FreeUSpec] = None, *,
                    channels_last: bool = False) -> Backend:
    """The backend that will run: the requested one (argument, else $FREEU_KERNELS_BACKEND), else the best.

    An explicitly requested backend that cannot run on ``device`` raises ValueError. The automatic
    choice passes over backends that do not suit the call (registry.suits: the fused kernels for
    float64, the CPU kernel for contiguous planes narrower than 16 columns; ``channels_last`` says the
    output is channels_last). Masks with more
    frequencies than the fused kernels handle (spec.uses_fft_fallback) run on the torch backend's FFT path.
    """
    name = requested if requested not in (None, Backend.AUTO, "auto") else os.environ.get(ENV_BACKEND) or "auto"
    try:
        backend = Backend(name)
    except ValueError:
        raise ValueError(f"backend must be one of {[b.value for b in Backend]}, got {name!r}") from None
    if backend is Backend.AUTO:
        backend = Backend(next(n for n in registry.auto_order(device)
                               if registry.is_available(n, device) and registry.suits(n, spec, channels_last)))
    elif not registry.is_available(backend.value, device):
        raise ValueError(
            f"backend {backend.value!r} is not available for {device.type} tensors "
            f"({registry.why_unavailable(backend.value, device)}); available: {available_backends(device)}"
        )
    if spec is not None and spec.uses_fft_fallback:
        return Backend.TORCH
    return backend


def _factor_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("freeu::fused_concat", mutates_args=())
def _fused_concat_op(
    x: torch.Tensor,
    h: torch.Tensor,
    b: torch.Tensor,
    s: torch.Tensor,
    *,
    threshold: int = 1,
    version: int = 1,
    backbone_channels: Optional[List[int]] = None,
    high_gain: float = 1.0,
    mask: str = "box",
    backend: str = "auto",
) -> torch.Tensor:
    spec = make_spec(x, h, threshold, version, backbone_channels, high_gain, mask)
    check_factor("b", b, x.device)
    check_factor("s", s, x.device)
    chosen = resolve_backend(backend, x.device, spec,
                             channels_last=output_memory_format(x) != torch.contiguous_format)
    factor_dtype = _factor_dtype(x.dtype)
    b = b.to(factor_dtype)
    s = s.to(factor_dtype)
    scale_map = None
    start, stop = spec.window
    if spec.version == 2 and stop > start and x.numel() > 0:
        # A CPU 0-d b combines with a device map as a scalar: no host-to-device copy, capture-safe.
        scale_map = (b - 1) * structure_map(x).to(factor_dtype) + 1
    return registry.kernel(chosen.value)(x, h, b, s, spec, scale_map)


@_fused_concat_op.register_fake
def _fused_concat_fake(x, h, b, s, *, threshold=1, version=1, backbone_channels=None, high_gain=1.0,
                       mask="box", backend="auto"):
    spec = make_spec(x, h, threshold, version, backbone_channels, high_gain, mask)
    return allocate_output(x, spec.skip_channels)


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    x, h, b, s = inputs
    ctx.options = dict(keyword_only_inputs)
    ctx.cx = x.shape[1]
    ctx.save_for_backward(x if keyword_only_inputs.get("version", 1) == 2 else None, b, s)


def _backward(ctx, grad):
    x, b, s = ctx.saved_tensors
    options = ctx.options
    cx = ctx.cx
    grad_x, grad_h = grad[:, :cx], grad[:, cx:]
    if options.get("version", 1) == 1:
        both = torch.ops.freeu.fused_concat(grad_x, grad_h, b, s, **options)
        return both[:, :cx], both[:, cx:], None, None
    # Version 2: filter the skip gradient (version 1 with b = 1 leaves grad_x as it is) ...
    v1_options = dict(options, version=1)
    filtered = torch.ops.freeu.fused_concat(grad_x, grad_h, torch.ones_like(b), s, **v1_options)[:, cx:]
    # ... and differentiate x[:, window] * ((b - 1) m^(x) + 1) through the map, its mean, min and max.
    start, stop = make_spec(x, grad_h, options.get("threshold", 1), 2, options.get("backbone_channels"),
                            options.get("high_gain", 1.0), options.get("mask", "box")).window
    compute = _factor_dtype(x.dtype)
    with torch.enable_grad():
        xd = x.detach().to(compute).requires_grad_(True)
        scale = (b.to(device=x.device, dtype=compute) - 1) * structure_map(xd) + 1
        scaled = xd[:, start:stop] * scale.unsqueeze(1)
        (through_window,) = torch.autograd.grad(scaled, xd, grad_x[:, start:stop].to(compute))
    outside = grad_x.to(compute).clone()
    outside[:, start:stop] = 0
    return (outside + through_window).to(x.dtype), filtered, None, None


_fused_concat_op.register_autograd(_backward, setup_context=_setup_context)


def _as_factor(name: str, value, like: torch.Tensor) -> torch.Tensor:
    """A Python number becomes a 0-d CPU tensor (read on the host by the kernels, no device copy)."""
    check_factor(name, value, like.device)
    if isinstance(value, torch.Tensor):
        return value
    return torch.tensor(float(value), dtype=torch.float64)


def fused_concat(
    x: torch.Tensor,
    h: torch.Tensor,
    b,
    s,
    *,
    threshold: int = 1,
    backend: Optional[str] = None,
    version: int = 1,
    backbone_channels: Optional[Sequence[int]] = None,
    high_gain: float = 1.0,
    mask: str = "box",
) -> torch.Tensor:
    """FreeU at one decoder skip concat, fused: ``cat([scaled backbone x, Fourier-filtered skip h], 1)``.

    Args:
        x: backbone features (N, Cx, H, W) or (N, Cx, F, H, W); float16, bfloat16, float32 (float64 on
            the torch backend).
        h: skip features (N, Ch, ...) with x's N, trailing dims, dtype and device; any Ch.
        b: backbone factor, a float or a 0-d tensor (keep it a tensor on x's device under
            torch.compile / CUDA graphs so a schedule can change it without recompiling or re-capturing).
        s: skip factor: the gain of the masked low frequencies, float or 0-d tensor.
        threshold: mask size (int >= 0; 0 leaves h unfiltered; past the plane size it clamps like the
            reference's slices).
        backend: "torch", "cpu", "triton", "cuda" or None/"auto" (then $FREEU_KERNELS_BACKEND, then the best
            available for x's device). An unavailable backend raises ValueError.
        version: 1 (scale the window by b) or 2 (scale it by (b - 1) * m^ + 1, m^ the normalised
            channel-mean map; a constant map gives m^ = 0, i.e. no scaling).
        backbone_channels: (start, stop) window of x's channels that is scaled; default (0, Cx // 2).
        high_gain: gain of the frequencies outside the mask (1.0 in the reference).
        mask: "box" (the official code's square) or "radial" (the paper's disc, dy^2 + dx^2 < t^2).

    Returns:
        (N, Cx + Ch, ...) tensor in x's dtype and memory format. x and h are not modified. Under
        no_grad / inference_mode nothing is saved for backward; otherwise gradients flow to x and h.
    """
    # Validate here too: the op's schema would otherwise reject a wrong type with a less helpful message.
    make_spec(x, h, threshold, version, backbone_channels, high_gain, mask)
    b = _as_factor("b", b, x)
    s = _as_factor("s", s, x)
    return torch.ops.freeu.fused_concat(
        x,
        h,
        b,
        s,
        threshold=threshold,
        version=version,
        backbone_channels=None if backbone_channels is None else list(backbone_channels),
        high_gain=high_gain,
        mask=mask,
        backend="auto" if backend is None else str(getattr(backend, "value", backend)),
    )
