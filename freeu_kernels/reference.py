"""The reference: a faithful replica of the official FreeU code path (FFT, shift, full mask, inverse FFT).

This is both the oracle of the test suite (called on float64 inputs) and the "what everyone runs today"
baseline of the benchmarks (called on the model's dtype). It follows the official repository's
``Fourier_filter`` and diffusers' ``fourier_filter``: float32 compute (float64 for float64 inputs),
``fftshift``, a mask of ones with the low-frequency square set to ``scale`` through Python slices,
``ifftshift``, ``ifftn(...).real``, cast back. The variants (high_gain, radial mask, version 2, channel
window) extend the same code path the way the A1111 extension, the paper and FreeU v2 define them.
Unlike the official code it never writes into its inputs.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.fft import fftn, fftshift, ifftn, ifftshift

from .spec import Mask, make_spec

__all__ = ["fourier_filter_reference", "fused_concat_reference", "structure_map"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def fourier_filter_reference(
    h: torch.Tensor, threshold: int, scale, *, high_gain: float = 1.0, mask: str = "box"
) -> torch.Tensor:
    """FreeU's skip filter exactly as the official code computes it, on every (n, c[, f]) H x W plane.

    ``X = fftshift(fftn(h))``; the mask is ``high_gain`` everywhere except the low-frequency region,
    which gets ``scale``: the box ``[H//2 - t : H//2 + t, W//2 - t : W//2 + t]`` (Python slices: the
    same asymmetry and clamping as the official code) or the radial disc ``dy^2 + dx^2 < t^2``;
    ``h' = ifftn(ifftshift(X * mask)).real`` cast back to h's dtype. ``scale`` is a float or 0-d tensor.
    """
    mask_kind = Mask(mask)
    if h.numel() == 0:  # nothing to filter (and some FFT libraries refuse empty transforms)
        return h.clone()
    compute = _compute_dtype(h.dtype)
    freq = fftshift(fftn(h.to(compute), dim=(-2, -1)), dim=(-2, -1))
    height, width = freq.shape[-2:]
    gains = torch.full((height, width), float(high_gain), dtype=compute, device=h.device)
    crow, ccol = height // 2, width // 2
    if mask_kind is Mask.BOX:
        gains[crow - threshold : crow + threshold, ccol - threshold : ccol + threshold] = scale
    else:
        dy = torch.arange(height, device=h.device) - crow
        dx = torch.arange(width, device=h.device) - ccol
        inside = (dy[:, None] ** 2 + dx[None, :] ** 2) < threshold * threshold
        gains = torch.where(inside, torch.as_tensor(scale, dtype=compute, device=h.device), gains)
    freq = ifftshift(freq * gains, dim=(-2, -1))
    return ifftn(freq, dim=(-2, -1)).real.to(h.dtype)


def structure_map(x: torch.Tensor) -> torch.Tensor:
    """FreeU v2's normalised channel-mean map m^, shape (N, [F,] H, W), float32 (float64 for float64 x).

    ``m = mean_c x``; ``m^ = (m - min m) / (max m - min m)`` with min and max over all of one sample's
    positions (every frame of a 5-D sample). Rule for a constant map, where the official code divides
    0 by 0: m^ = 0 there, so the v2 scale ``(b - 1) m^ + 1`` is 1 and the backbone passes unscaled
    (no structure, no boost). The safe denominator keeps the backward finite too.
    """
    mean = x.mean(dim=1, dtype=_compute_dtype(x.dtype))
    flat = mean.flatten(1)
    low = flat.amin(dim=1)
    span = flat.amax(dim=1) - low
    span = torch.where(span > 0, span, torch.ones_like(span))
    shape = (-1,) + (1,) * (mean.dim() - 1)
    return (mean - low.view(shape)) / span.view(shape)


def fused_concat_reference(
    x: torch.Tensor,
    h: torch.Tensor,
    b,
    s,
    threshold: int = 1,
    *,
    version: int = 1,
    backbone_channels: Optional[Sequence[int]] = None,
    high_gain: float = 1.0,
    mask: str = "box",
) -> torch.Tensor:
    """FreeU at one skip concat the way the official code does it: scale, FFT filter, ``torch.cat``.

    Version 1 multiplies backbone channels ``[start, stop)`` (default the first half) by ``b`` in x's
    dtype; version 2 multiplies them by ``(b - 1) * structure_map(x) + 1``. The skip features go through
    :func:`fourier_filter_reference`. Inputs are never modified.
    """
    spec = make_spec(x, h, threshold, version, backbone_channels, high_gain, mask)
    start, stop = spec.window
    if spec.version == 1 or stop == start or x.numel() == 0:
        factor = b
    else:
        factor = ((b - 1) * structure_map(x) + 1).unsqueeze(1)
    # Built out of place (the official code writes into x) so the reference is also differentiable.
    scaled = (x[:, start:stop] * factor).to(x.dtype)
    backbone = torch.cat([x[:, :start], scaled, x[:, stop:]], dim=1)
    skip = fourier_filter_reference(h, spec.threshold, s, high_gain=spec.high_gain, mask=spec.mask.value)
    return torch.cat([backbone, skip], dim=1)
