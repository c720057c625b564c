"""The adversarial pass of issue 13: huge thresholds, second-order and forward-mode AD, empty planes."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as forward_ad

from conftest import BACKENDS, assert_matches_oracle, make_inputs, oracle
from freeu_kernels import fused_concat, fused_concat_reference
from freeu_kernels.spec import Mask, clamp_threshold, frequency_band

HUGE_THRESHOLDS = [3037000500, 2**32, 2**62, 2**63, 2**64 + 3]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", ["radial", "box"])
def test_huge_threshold_selects_every_frequency(backend, mask):
    """A radius past the plane's diagonal (a box past the plane) gives every frequency gain s: h' = s h.

    3037000500^2 is past 2^63: before the clamp the radial test overflowed int64 and the kernels, the
    torch backend and the reference each went wrong their own way (or raised OverflowError).
    """
    x, h = make_inputs("cx_ne_ch", torch.float32, seed=4)
    expected = torch.cat([x[:, :2] * 1.3, x[:, 2:], h * 0.4], dim=1).double().cpu()
    for threshold in HUGE_THRESHOLDS:
        ref = oracle(x, h, 1.3, 0.4, threshold, mask=mask)
        torch.testing.assert_close(ref, expected, rtol=1e-6, atol=1e-6)
        out = fused_concat(x, h, 1.3, 0.4, threshold=threshold, mask=mask, backend=backend)
        assert_matches_oracle(out, ref, torch.float32)


def test_clamped_threshold_selects_what_the_unclamped_one_does():
    """The clamp changes no selection: box per axis as Python's slice (huge ints included), radial as the
    disc test evaluated in exact integers."""
    for size in (1, 2, 5, 8):
        for t in list(range(0, 3 * size + 2)) + HUGE_THRESHOLDS:
            rows = range(size)[size // 2 - t : size // 2 + t]
            band = frequency_band(size, 3, (t, 1), Mask.BOX)
            assert band.ny == len(rows) and (not len(rows) or band.ky0 == rows.start - size // 2)
    for height, width in ((5, 8), (16, 16), (1, 7)):
        for t in list(range(0, height + width + 3)) + HUGE_THRESHOLDS:
            radius, _ = clamp_threshold(height, width, t, Mask.RADIAL)
            assert radius * radius < 2**63
            exact = {(dy, dx) for dy in range(-(height // 2), height - height // 2)
                     for dx in range(-(width // 2), width - width // 2) if dy * dy + dx * dx < t * t}
            band = frequency_band(height, width, t, Mask.RADIAL)
            weights = band.weight_table()
            selected = {(band.ky0 + i, band.kx0 + j) for i in range(band.ny) for j in range(band.nx) if weights[i, j]}
            assert selected == exact, (height, width, t)


def _inputs64(shape=(2, 3, 4, 5), skip=2):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    h = torch.randn((shape[0], skip) + shape[2:], generator=gen, dtype=torch.float64, requires_grad=True)
    return x, h


@pytest.mark.parametrize("options", [dict(version=1), dict(version=2), dict(version=2, backbone_channels=[(0, 1), (2, 3)]),
                                     dict(version=2, mask="radial", threshold=2, high_gain=1.1)],
                         ids=["v1", "v2", "v2_two_ranges", "v2_radial"])
def test_gradgradcheck_float64(options):
    """Second-order gradients (gradient penalties, double backward) in x and in the output gradient."""
    x, h = _inputs64()
    fn = lambda a, c: fused_concat(a, c, 1.3, 0.4, backend="torch", **options)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x, h))


@pytest.mark.parametrize("options", [dict(version=1), dict(version=2), dict(version=2, backbone_channels=[(0, 1), (2, 3)]),
                                     dict(version=1, threshold=(1, 2), backbone_channels=[(2, 3), (0, 1)])],
                         ids=["v1", "v2", "v2_two_ranges", "v1_pair_ranges"])
def test_forward_mode_matches_the_reference(options):
    """torch.func.jvp and torch.autograd.forward_ad give the tangent of the reference (not zero or None)."""
    x, h = _inputs64()
    x, h = x.detach(), h.detach()
    gen = torch.Generator().manual_seed(8)
    tx, th = torch.randn(x.shape, generator=gen, dtype=x.dtype), torch.randn(h.shape, generator=gen, dtype=h.dtype)
    ours = lambda a, c: fused_concat(a, c, 1.3, 0.4, backend="torch", **options)  # noqa: E731
    ref = lambda a, c: fused_concat_reference(a, c, 1.3, 0.4, **options)  # noqa: E731
    _, expected = torch.func.jvp(ref, (x, h), (tx, th))
    assert expected.abs().max() > 0
    _, tangent = torch.func.jvp(ours, (x, h), (tx, th))
    torch.testing.assert_close(tangent, expected, rtol=1e-9, atol=1e-11)
    with forward_ad.dual_level():
        out = ours(forward_ad.make_dual(x, tx), forward_ad.make_dual(h, th))
        torch.testing.assert_close(forward_ad.unpack_dual(out).tangent, expected, rtol=1e-9, atol=1e-11)
    _, only_h = torch.func.jvp(ref, (x, h), (torch.zeros_like(x), th))
    with forward_ad.dual_level():  # a tangent on h only: x's is zero
        out = ours(x, forward_ad.make_dual(h, th))
        torch.testing.assert_close(forward_ad.unpack_dual(out).tangent, only_h, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_on_each_backend(backend):
    x, h = make_inputs("odd7x5", torch.float32, seed=1)
    tx, th = torch.randn_like(x), torch.randn_like(h)
    _, tangent = torch.func.jvp(lambda a, c: fused_concat(a, c, 1.3, 0.4, backend=backend), (x, h), (tx, th))
    # version 1 is linear: the tangent is the op applied to the tangents
    assert_matches_oracle(tangent, oracle(tx, th, 1.3, 0.4), torch.float32)


@pytest.mark.parametrize("shape", [(1, 2, 0, 4), (1, 2, 3, 0), (1, 2, 0, 3, 3)], ids=["H0", "W0", "F0"])
@pytest.mark.parametrize("version", [1, 2])
def test_backward_on_empty_planes(shape, version):
    """Version 2's backward used to raise IndexError from amin on an empty map."""
    x = torch.randn(shape, requires_grad=True)
    h = torch.randn(shape, requires_grad=True)
    out = fused_concat(x, h, 1.3, 0.4, version=version)
    gx, gh = torch.autograd.grad(out.sum(), (x, h))
    assert gx.shape == x.shape and gh.shape == h.shape
    _, tangent = torch.func.jvp(lambda a, c: fused_concat(a, c, 1.3, 0.4, version=version),
                                (x.detach(), h.detach()), (torch.zeros(shape), torch.zeros(shape)))
    assert tangent.shape == out.shape


def test_nonfinite_tensor_factors_are_not_inspected():
    """Tensor factors stay unchecked (no host sync): a NaN s propagates into the filtered skip only."""
    x, h = make_inputs("square8", torch.float32)
    out = fused_concat(x, h, torch.tensor(1.2), torch.tensor(float("nan")), backend="torch")
    assert torch.isnan(out[:, 4:]).all() and torch.isfinite(out[:, :4]).all()
