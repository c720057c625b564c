"""Hypothesis: random shapes, thresholds, masks and factors against the float64 oracle, every backend."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import BACKENDS, DEVICE, assert_matches_oracle, oracle
from freeu_kernels import fused_concat


@st.composite
def freeu_calls(draw):
    ndim = draw(st.sampled_from([4, 5]))
    n = draw(st.integers(1, 2))
    cx = draw(st.integers(0, 5))
    ch = draw(st.integers(0, 4))
    spatial = tuple(draw(st.integers(1, 11)) for _ in range(ndim - 2))
    if ndim == 5:
        spatial = (draw(st.integers(1, 3)),) + spatial[1:]
    start = draw(st.integers(0, cx))
    options = dict(
        threshold=draw(st.integers(0, 5)),
        mask=draw(st.sampled_from(["box", "radial"])),
        version=draw(st.sampled_from([1, 2])),
        high_gain=draw(st.sampled_from([1.0, 1.0, 0.8, 1.25])),
        backbone_channels=draw(st.sampled_from([None, (start, draw(st.integers(start, cx)))])),
    )
    factors = (draw(st.floats(0.0, 2.0)), draw(st.floats(0.0, 2.0)))
    channels_last = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return (n, cx, ch, spatial), options, factors, channels_last, seed


def _check(backend, call, dtype):
    (n, cx, ch, spatial), options, (b, s), channels_last, seed = call
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, cx) + spatial, generator=gen).to(DEVICE, dtype)
    h = torch.randn((n, ch) + spatial, generator=gen).to(DEVICE, dtype)
    if channels_last:
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x, h = x.contiguous(memory_format=fmt), h.contiguous(memory_format=fmt)
    out = fused_concat(x, h, b, s, backend=backend, **options)
    assert out.shape == (n, cx + ch) + spatial
    if out.numel():
        input_scale = max(t.abs().max().item() if t.numel() else 0.0 for t in (x.float(), h.float()))
        assert_matches_oracle(out, oracle(x, h, b, s, **options), dtype, input_scale)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=freeu_calls())
def test_torch_backend_properties(call):
    _check("torch", call, torch.float64)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="cpu backend not available")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=freeu_calls(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_cpu_backend_properties(call, dtype):
    _check("cpu", call, dtype)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend not available")
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=freeu_calls())
def test_triton_backend_properties(call):
    _check("triton", call, torch.float32)


@pytest.mark.skipif("cuda" not in BACKENDS, reason="cuda backend not available")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=freeu_calls())
def test_cuda_backend_properties(call):
    _check("cuda", call, torch.float32)
