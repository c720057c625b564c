"""fused_concat against the float64 FFT oracle: every backend x dtype x shape family x threshold x factors."""

from __future__ import annotations

import pytest
import torch

import freeu_kernels
from conftest import (
    BACKENDS,
    DEVICE,
    SHAPE_FAMILIES,
    assert_matches_oracle,
    backend_dtypes,
    make_inputs,
    oracle,
)
from freeu_kernels import fused_concat
from freeu_kernels.spec import make_spec

MATRIX = [(backend, dtype) for backend in BACKENDS for dtype in backend_dtypes(backend)]
FACTORS = {"boost": (1.3, 0.4), "s_zero": (1.2, 0.0)}


def _dtype_id(dtype):
    return str(dtype).replace("torch.", "")


@pytest.mark.parametrize("backend,dtype", MATRIX, ids=[f"{b}-{_dtype_id(d)}" for b, d in MATRIX])
@pytest.mark.parametrize("family", list(SHAPE_FAMILIES))
@pytest.mark.parametrize("threshold", [0, 1, 2, 3])
def test_matches_oracle(backend, dtype, family, threshold, poisoned_outputs):
    """Every output element is written (NaN-poisoned buffer) and equals the FFT reference within tolerance."""
    factors = "s_zero" if threshold == 2 else "boost"
    b, s = FACTORS[factors]
    x, h = make_inputs(family, dtype, seed=threshold)
    x_before, h_before = x.clone(), h.clone()
    b64, s64 = torch.tensor(b, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
    out = fused_concat(x, h, b64, s64, threshold=threshold, backend=backend)
    assert_matches_oracle(out, oracle(x, h, b, s, threshold), dtype)
    assert out.dtype == dtype and out.device == x.device
    assert torch.equal(x, x_before) and torch.equal(h, h_before), "inputs were modified"
    if SHAPE_FAMILIES[family][2] == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["odd7x5", "5d", "channels_last"])
def test_neutral_factors_equal_plain_cat(backend, family):
    """b = s = 1 (high_gain 1) is exactly torch.cat, bit for bit, at any threshold."""
    x, h = make_inputs(family, torch.float32, seed=3)
    for threshold in (0, 1, 3):
        out = fused_concat(x, h, 1.0, 1.0, threshold=threshold, backend=backend)
        assert torch.equal(out, torch.cat([x, h], dim=1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 8, 16, 16), (1, 6, 24, 40)], ids=["kronecker16x16", "separable24x40"])
def test_low_precision_at_least_as_accurate_as_diffusers_path(backend, dtype, shape):
    """Against the float64 oracle, our error is no larger than the official path run in that dtype.

    Both shapes: the torch backend factors small planes as one Kronecker table and larger ones as
    separable row factors, each with its own low-precision arithmetic.
    """
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=gen)
    h = torch.randn(shape, generator=gen) + 3.0  # strong DC, as in real skip features
    x, h = x.to(DEVICE, dtype), h.to(DEVICE, dtype)
    ref = oracle(x, h, 1.3, 0.4)
    ours = fused_concat(x, h, 1.3, 0.4, backend=backend).double().cpu()
    official = freeu_kernels.fused_concat_reference(x, h, 1.3, 0.4).double().cpu()
    err_ours = (ours - ref).norm().item()
    err_official = (official - ref).norm().item()
    assert err_ours <= err_official * 1.02 + 1e-12, (err_ours, err_official)


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_past_plane_size_clamps_like_reference(backend):
    x, h = make_inputs("odd7x5", torch.float32, seed=1)
    for threshold in (4, 6, 9, 40):
        out = fused_concat(x, h, 1.1, 0.3, threshold=threshold, backend=backend)
        assert_matches_oracle(out, oracle(x, h, 1.1, 0.3, threshold), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    """N = 0, Cx = 0 or Ch = 0 give the right (partly) empty result."""
    for x_shape, h_shape in [((0, 3, 5, 5), (0, 2, 5, 5)), ((2, 0, 5, 5), (2, 3, 5, 5)), ((2, 4, 5, 5), (2, 0, 5, 5))]:
        x = torch.randn(x_shape, device=DEVICE)
        h = torch.randn(h_shape, device=DEVICE)
        out = fused_concat(x, h, 1.4, 0.5, backend=backend)
        assert out.shape == (x_shape[0], x_shape[1] + h_shape[1], 5, 5)
        if out.numel():
            assert_matches_oracle(out, oracle(x, h, 1.4, 0.5), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_stays_inside_its_plane(backend):
    x = torch.randn(2, 3, 6, 6, device=DEVICE)
    h = torch.randn(2, 3, 6, 6, device=DEVICE)
    h[1, 2, 3, 4] = float("nan")
    out = fused_concat(x, h, 1.2, 0.5, backend=backend)
    nan_planes = torch.isnan(out).flatten(2).any(dim=2)
    expected = torch.zeros_like(nan_planes)
    expected[1, 3 + 2] = True
    assert torch.equal(nan_planes, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_is_callable_directly(backend):
    """torch.ops.freeu.fused_concat with 0-d tensors has the same semantics as the Python wrapper."""
    x, h = make_inputs("square8", torch.float32)
    b, s = torch.tensor(1.5), torch.tensor(0.2)
    direct = torch.ops.freeu.fused_concat(x, h, b, s, threshold=2, backend=backend)
    assert torch.equal(direct, fused_concat(x, h, b, s, threshold=2, backend=backend))


def test_backends_agree_with_each_other():
    """Every backend computes the same function (float32, a few shapes)."""
    for family in ("odd7x5", "5d", "many_tiny"):
        x, h = make_inputs(family, torch.float32, seed=11)
        outs = [fused_concat(x, h, 1.25, 0.6, threshold=1, backend=b).cpu() for b in BACKENDS]
        for other in outs[1:]:
            torch.testing.assert_close(other, outs[0], rtol=1e-5, atol=1e-5)


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("FREEU_KERNELS_BACKEND", "torch")
    assert freeu_kernels.resolve_backend(None, torch.device("cpu")).value == "torch"
    monkeypatch.setenv("FREEU_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend"):
        freeu_kernels.resolve_backend(None, torch.device("cpu"))


def test_available_backends_on_cpu_lead_with_the_fused_kernel_when_built():
    """On CPU tensors "auto" is the fused C++ kernel when its library loads, else the torch backend."""
    names = freeu_kernels.available_backends("cpu")
    best = "cpu" if "cpu" in names else "torch"
    assert names[0] == best and "torch" in names
    assert freeu_kernels.resolve_backend("auto", torch.device("cpu")).value == best


def test_auto_on_cpu_sends_narrow_planes_to_the_torch_backend():
    """The CPU kernel loses to the torch backend on planes narrower than 16 that are not a whole number of
    its vectors (registry._cpu_kernel_wins; width 10 is that for every kernel copy)."""
    if "cpu" not in freeu_kernels.available_backends("cpu"):
        pytest.skip("CPU kernel library not built")
    narrow, wide = torch.randn(1, 2, 8, 10), torch.randn(1, 2, 8, 16)
    assert freeu_kernels.resolve_backend("auto", torch.device("cpu"), make_spec(narrow, narrow)).value == "torch"
    assert freeu_kernels.resolve_backend("auto", torch.device("cpu"), make_spec(wide, wide)).value == "cpu"
    # channels_last runs across channels, where narrow planes cost the kernel nothing extra
    assert freeu_kernels.resolve_backend("auto", torch.device("cpu"), make_spec(narrow, narrow),
                                         channels_last=True).value == "cpu"


def test_auto_passes_over_fused_kernels_for_float64():
    """float64 (gradcheck, references) is the torch backend's alone; "auto" must not pick a fused kernel."""
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    spec = make_spec(x, x)
    assert freeu_kernels.resolve_backend("auto", torch.device("cpu"), spec).value == "torch"
    out = fused_concat(x, x, 1.2, 0.5)
    assert out.dtype == torch.float64


# Issue 12: the A1111 extension's rectangular cutoff box (a per-axis threshold pair) and its wrapped
# channel region (several backbone ranges), on non-square planes, against the reference.
PAIR_THRESHOLDS = [(1, 2), (2, 0), (0, 3), (3, 1), (1, 9)]
RANGE_CASES = {
    "wrapped": lambda cx: [(cx - 1, cx), (0, 1)],
    "overlapping": lambda cx: [(0, cx // 2 + 1), (cx // 2, cx)],
    "one_of_many_empty": lambda cx: [(1, 1), (0, cx - 1)],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["odd7x5", "nonpow2_12x20", "channels_last", "5d", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_axis_threshold_and_channel_ranges_match_oracle(backend, family, dtype, poisoned_outputs):
    x, h = make_inputs(family, dtype, seed=9)
    cx = x.shape[1]
    for i, threshold in enumerate(PAIR_THRESHOLDS):
        ranges = list(RANGE_CASES.values())[i % len(RANGE_CASES)](cx)
        for version in (1, 2):
            options = dict(threshold=threshold, backbone_channels=ranges, version=version, high_gain=1.1)
            out = fused_concat(x, h, 1.3, 0.4, backend=backend, **options)
            ref = oracle(x, h, 1.3, 0.4, **options)
            assert_matches_oracle(out, ref, dtype)
    # An equal pair is the int threshold, bit for bit; a radial equal pair is the radial int.
    for mask in ("box", "radial"):
        assert torch.equal(fused_concat(x, h, 1.3, 0.4, threshold=(2, 2), mask=mask, backend=backend),
                           fused_concat(x, h, 1.3, 0.4, threshold=2, mask=mask, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_ranges_through_the_op_schema(backend):
    """torch.ops.freeu.fused_concat takes the flat pair list and threshold_cols (ops.py documents it)."""
    x, h = make_inputs("odd7x5", torch.float32, seed=2)
    b, s = torch.tensor(1.5), torch.tensor(0.2)
    direct = torch.ops.freeu.fused_concat(x, h, b, s, threshold=1, threshold_cols=2, backbone_channels=[2, 3, 0, 1],
                                          backend=backend)
    wrapped = fused_concat(x, h, b, s, threshold=(1, 2), backbone_channels=[(2, 3), (0, 1)], backend=backend)
    assert torch.equal(direct, wrapped)
    assert_matches_oracle(direct, oracle(x, h, 1.5, 0.2, (1, 2), backbone_channels=[(0, 1), (2, 3)]), torch.float32)
