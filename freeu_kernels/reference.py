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

from .spec import Mask, clamp_threshold, make_spec

__all__ = ["fourier_filter_reference", "fused_concat_reference", "scale_backbone", "structure_map"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def fourier_filter_reference(
    h: torch.Tensor, threshold, scale, *, high_gain: float = 1.0, mask: str = "box"
) -> torch.Tensor:
    """FreeU's skip filter exactly as the official code computes it, on every (n, c[, f]) H x W plane.

    ``X = fftshift(fftn(h))``; the mask is ``high_gain`` everywhere except the low-frequency region,
    which gets ``scale``: the box ``[H//2 - t_rows : H//2 + t_rows, W//2 - t_cols : W//2 + t_cols]``
    (Python slices: the same asymmetry and clamping as the official code; ``threshold`` is t or the
    pair (t_rows, t_cols)) or the radial disc ``dy^2 + dx^2 < t^2``;
    ``h' = ifftn(ifftshift(X * mask)).real`` cast back to h's dtype. ``scale`` is a float or 0-d tensor.
    The threshold is first clamped to the plane (spec.clamp_threshold: the same selection, no overflow).
    """
    mask_kind = Mask(mask)
    height, width = h.shape[-2:]
    t_rows, t_cols = clamp_threshold(height, width, threshold, mask_kind)
    if h.numel() == 0:  # nothing to filter (and some FFT libraries refuse empty transforms)
        return h.clone()
    compute = _compute_dtype(h.dtype)
    freq = fftshift(fftn(h.to(compute), dim=(-2, -1)), dim=(-2, -1))
    gains = torch.full((height, width), float(high_gain), dtype=compute, device=h.device)
    crow, ccol = height // 2, width // 2
    if mask_kind is Mask.BOX:
        gains[crow - t_rows : crow + t_rows, ccol - t_cols : ccol + t_cols] = scale
    else:
        dy = torch.arange(height, device=h.device) - crow
        dx = torch.arange(width, device=h.device) - ccol
        inside = (dy[:, None] ** 2 + dx[None, :] ** 2) < t_rows * t_rows
        gains = torch.where(inside, torch.as_tensor(scale, dtype=compute, device=h.device), gains)
    freq = ifftshift(freq * gains, dim=(-2, -1))
    return ifftn(freq, dim=(-2, -1)).real.to(h.dtype)


# On the CPU a reduction with a wider dtype than its input first copies the whole input to that dtype
# (a float32 copy of all of x for bfloat16/float16: twice x's bytes, more than the op's output when
# Cx > Ch). Summing a few channel slabs at a time bounds that copy to 1/8 of it; GPU reductions widen
# inside the kernel and take one pass.
_CPU_MEAN_SLABS = 8


def _channel_mean(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """mean over dim 1 accumulated in ``dtype``, without a full-size widened copy of x on the CPU."""
    channels = x.shape[1]
    if x.device.type != "cpu" or x.dtype == dtype or channels < 2:
        return x.mean(dim=1, dtype=dtype)
    step = -(-channels // _CPU_MEAN_SLABS)
    total = x[:, :step].sum(dim=1, dtype=dtype)
    for start in range(step, channels, step):
        total = total + x[:, start : start + step].sum(dim=1, dtype=dtype)
    return total / channels


def structure_map(x: torch.Tensor) -> torch.Tensor:
    """FreeU v2's normalised channel-mean map m^, shape (N, [F,] H, W), float32 (float64 for float64 x).

    ``m = mean_c x``; ``m^ = (m - min m) / (max m - min m)`` with min and max over all of one sample's
    positions (every frame of a 5-D sample). Rule for a constant map, where the official code divides
    0 by 0: m^ = 0 there, so the v2 scale ``(b - 1) m^ + 1`` is 1 and the backbone passes unscaled
    (no structure, no boost). The safe denominator keeps the backward finite too.
    """
    mean = _channel_mean(x, _compute_dtype(x.dtype))
    flat = mean.flatten(1)
    low = flat.amin(dim=1)
    span = flat.amax(dim=1) - low
    span = torch.where(span > 0, span, torch.ones_like(span))
    shape = (-1,) + (1,) * (mean.dim() - 1)
    return (mean - low.view(shape)) / span.view(shape)


def scale_backbone(x: torch.Tensor, b, windows, version: int, compute_dtype=None) -> torch.Tensor:
    """x with the channels of every range in ``windows`` scaled: by b (version 1) or by (b - 1) m^ + 1
    (version 2, m^ = structure_map(x)); the other channels unchanged. Built out of place with slices and
    one cat, so it is differentiable (the op's version-2 backward and forward rules differentiate it).

    The product is formed in x's type promotion with b (the official code's ``x[:, a:b] * factor``) and
    cast to ``compute_dtype`` (default x's dtype).
    """
    out_dtype = x.dtype if compute_dtype is None else compute_dtype
    factor = b
    if version == 2 and windows and x.numel() > 0:
        factor = ((b - 1) * structure_map(x) + 1).unsqueeze(1)
    pieces, done = [], 0
    for start, stop in windows:
        pieces += [x[:, done:start].to(out_dtype), (x[:, start:stop] * factor).to(out_dtype)]
        done = stop
    pieces.append(x[:, done:].to(out_dtype))
    return torch.cat(pieces, dim=1)


def fused_concat_reference(
    x: torch.Tensor,
    h: torch.Tensor,
    b,
    s,
    threshold=1,
    *,
    version: int = 1,
    backbone_channels=None,
    high_gain: float = 1.0,
    mask: str = "box",
) -> torch.Tensor:
    """FreeU at one skip concat the way the official code does it: scale, FFT filter, ``torch.cat``.

    Version 1 multiplies the backbone channels of each range of ``backbone_channels`` (default the first
    half; one ``(start, stop)`` pair or several) by ``b`` in x's dtype; version 2 multiplies them by
    ``(b - 1) * structure_map(x) + 1``. The skip features go through :func:`fourier_filter_reference`
    with ``threshold`` an int or a (t_rows, t_cols) pair. Inputs are never modified.
    """
    spec = make_spec(x, h, threshold, version, backbone_channels, high_gain, mask)
    backbone = scale_backbone(x, b, spec.windows, spec.version)
    skip = fourier_filter_reference(h, spec.threshold, s, high_gain=spec.high_gain, mask=spec.mask.value)
    return torch.cat([backbone, skip], dim=1)
