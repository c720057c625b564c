"""Every FreeU variant (v2 scaling, channel window, high-frequency gain, radial mask, FFT fallback) per backend."""

from __future__ import annotations

import pytest
import torch

from conftest import BACKENDS, DEVICE, assert_matches_oracle, make_inputs, oracle
from freeu_kernels import fused_concat, fused_concat_reference, structure_map
from freeu_kernels.spec import MAX_LOWRANK_FREQUENCIES_PER_AXIS, frequency_band, make_spec, Mask

VARIANTS = {
    "v2": dict(version=2),
    "window": dict(backbone_channels=(1, 2)),
    "v2_window": dict(version=2, backbone_channels=(0, 1)),
    "high_gain": dict(high_gain=1.15),
    "radial": dict(mask="radial"),
    "radial_v2_high_gain": dict(mask="radial", version=2, high_gain=0.9),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", ["odd7x5", "5d", "channels_last", "separable_24x40"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_variant_matches_oracle(backend, variant, family, dtype, poisoned_outputs):
    options = VARIANTS[variant]
    x, h = make_inputs(family, dtype, seed=5)
    for threshold in (1, 3):
        out = fused_concat(x, h, 1.4, 0.3, threshold=threshold, backend=backend, **options)
        assert_matches_oracle(out, oracle(x, h, 1.4, 0.3, threshold, **options), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_v2_constant_map_gives_finite_unscaled_backbone(backend):
    """A constant channel-mean map (official code: 0/0) gives m^ = 0, so the backbone passes unscaled."""
    x = torch.full((2, 4, 5, 5), 0.7, device=DEVICE)
    h = torch.randn(2, 3, 5, 5, device=DEVICE)
    out = fused_concat(x, h, 1.6, 0.5, version=2, backend=backend)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, :4], x)
    assert torch.equal(structure_map(x), torch.zeros(2, 5, 5, device=DEVICE))


def test_v2_map_is_per_sample_over_all_frames():
    """5-D: the min/max of the map run over every frame of one sample, not per frame."""
    x = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64)
    m = structure_map(x)
    assert m.shape == (2, 4, 5, 6)
    for n in range(2):
        assert m[n].min().item() == 0.0 and m[n].max().item() == pytest.approx(1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 12, 14), (1, 1, 24, 20)], ids=["kronecker12x14", "separable24x20"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_largest_low_rank_masks_match_oracle(backend, shape, dtype):
    """The largest masks still on the low-rank path (MAX_LOWRANK_FREQUENCIES_PER_AXIS per axis)."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    h = (torch.randn(shape, generator=gen) + 1.0).to(DEVICE, dtype)
    threshold = MAX_LOWRANK_FREQUENCIES_PER_AXIS // 2
    for mask in ("box", "radial"):
        assert not make_spec(x, h, threshold, mask=mask).uses_fft_fallback
        out = fused_concat(x, h, 1.2, 0.4, threshold=threshold, mask=mask, high_gain=1.1, backend=backend)
        assert_matches_oracle(out, oracle(x, h, 1.2, 0.4, threshold, mask=mask, high_gain=1.1), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_masks_take_the_fft_path_and_stay_exact(backend):
    """Past MAX_LOWRANK_FREQUENCIES_PER_AXIS the op routes to the FFT path; results still match the oracle."""
    x = torch.randn(1, 2, 40, 36, device=DEVICE)
    h = torch.randn(1, 2, 40, 36, device=DEVICE)
    threshold = MAX_LOWRANK_FREQUENCIES_PER_AXIS // 2 + 2
    for mask in ("box", "radial"):
        spec = make_spec(x, h, threshold, mask=mask)
        assert spec.uses_fft_fallback
        out = fused_concat(x, h, 1.2, 0.4, threshold=threshold, mask=mask, high_gain=1.1, backend=backend)
        assert_matches_oracle(out, oracle(x, h, 1.2, 0.4, threshold, mask=mask, high_gain=1.1), torch.float32)


def test_box_band_follows_python_slices():
    """The box's frequency range is exactly what the reference's slice selects, clamped and wrapped."""
    for size in (1, 2, 3, 7, 8):
        for t in range(0, 12):
            rows = range(size)[size // 2 - t : size // 2 + t]
            band = frequency_band(size, size, t, Mask.BOX)
            assert band.ny == len(rows)
            if len(rows):
                assert band.ky0 == rows.start - size // 2


def test_radial_band_counts_the_disc():
    band = frequency_band(64, 64, 3, Mask.RADIAL)
    assert (band.ky0, band.ny) == (-2, 5)
    assert int(band.weight_table().sum()) == sum(
        1 for dy in range(-2, 3) for dx in range(-2, 3) if dy * dy + dx * dx < 9
    )


def _direct_restatement(x, h, b, s, t_rows, t_cols, ranges, high_gain):
    """Issue 12's semantics stated directly: each channel in any range scaled by b; the skip filtered with
    the gains ``high_gain`` except s on the slice [H//2 - t_rows : H//2 + t_rows, W//2 - t_cols : W//2 + t_cols]
    of the shifted spectrum."""
    scaled = {c for start, stop in ranges for c in range(start, stop)}
    backbone = torch.stack([x[:, c] * b if c in scaled else x[:, c] for c in range(x.shape[1])], dim=1)
    height, width = h.shape[-2:]
    spectrum = torch.fft.fftshift(torch.fft.fft2(h), dim=(-2, -1))
    gains = torch.full((height, width), high_gain, dtype=torch.float64)
    gains[height // 2 - t_rows : height // 2 + t_rows, width // 2 - t_cols : width // 2 + t_cols] = s
    skip = torch.fft.ifft2(torch.fft.ifftshift(spectrum * gains, dim=(-2, -1))).real
    return torch.cat([backbone, skip], dim=1)


def test_reference_per_axis_box_and_ranges_restate_the_semantics():
    """The reference's per-axis box and channel ranges equal the direct statement (not spec's band)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 7, 10, generator=gen, dtype=torch.float64)
    h = torch.randn(2, 3, 7, 10, generator=gen, dtype=torch.float64)
    for t_rows, t_cols in [(1, 2), (3, 0), (0, 4), (2, 5), (5, 7), (9, 1)]:
        for ranges in ([(4, 5), (0, 2)], [(0, 3), (2, 5)], [(1, 4)], [(2, 2), (3, 4)]):
            ref = fused_concat_reference(x, h, 1.3, 0.4, (t_rows, t_cols), backbone_channels=ranges, high_gain=1.2)
            direct = _direct_restatement(x, h, 1.3, 0.4, t_rows, t_cols, ranges, 1.2)
            torch.testing.assert_close(ref, direct, rtol=1e-12, atol=1e-12)


def test_per_axis_band_is_the_slices_of_each_axis():
    for height, width in ((7, 10), (8, 5), (1, 6)):
        for t_rows in range(0, 12):
            for t_cols in range(0, 12):
                band = frequency_band(height, width, (t_rows, t_cols), Mask.BOX)
                rows = range(height)[height // 2 - t_rows : height // 2 + t_rows]
                cols = range(width)[width // 2 - t_cols : width // 2 + t_cols]
                assert (band.ny, band.nx) == (len(rows), len(cols))
                if len(rows) and len(cols):
                    assert (band.ky0, band.kx0) == (rows.start - height // 2, cols.start - width // 2)


def test_ranges_merge_and_the_first_is_the_kernels_window():
    x = torch.randn(1, 8, 4, 4)
    spec = make_spec(x, x, backbone_channels=[(6, 8), (0, 2), (1, 3), (3, 3)])
    assert spec.windows == ((0, 3), (6, 8)) and spec.window == (0, 3) and spec.extra_windows == ((6, 8),)
    assert make_spec(x, x, backbone_channels=[]).windows == ()
    assert make_spec(x, x, backbone_channels=(2, 5)).windows == ((2, 5),)
