"""Triton-specific paths: the launch plan's choices, the twiddle table, rounding, caching and the rarer code paths.

The shared oracle matrix (test_fused_concat.py, test_variants.py) runs every family through the kernel; here
each test pins which path of the kernel a case takes (so a plan change cannot silently stop exercising one)
and checks what the matrix cannot see: bit-exact rounding, the table's values, the plan cache.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import BACKENDS, DEVICE, assert_matches_oracle, make_inputs, oracle
from freeu_kernels import fused_concat
from freeu_kernels.spec import allocate_output, make_spec

pytestmark = pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend not available")

if "triton" in BACKENDS:
    from freeu_kernels.backends import triton_backend as tb
    from freeu_kernels.backends import triton_kernels as tk


def _plan(x, h, threshold=1, mask="box", device_type=None, has_map=False):
    spec = make_spec(x, h, threshold, mask=mask)
    out = allocate_output(x, spec.skip_channels)
    strides = [tb.logical_strides(t) for t in (x, h, out)]
    return tb.launch_plan(spec, *strides, device_type or x.device.type, True, has_map)


def test_gpu_plan_for_sdxl_puts_one_plane_per_warp_and_flat_vector_rows():
    """32x32 fp16 on a GPU: one plane per one-warp program, unrolled band, flat planes, 16-byte backbone."""
    x = torch.empty(2, 1280, 32, 32, dtype=torch.float16, device="meta")
    h = torch.empty(2, 640, 32, 32, dtype=torch.float16, device="meta")
    plan = _plan(x, h, device_type="cuda")
    c = plan.constexprs
    assert plan.num_warps == 1 and c["BLOCK_P"] == 1 and not c["SWEEP"] and c["STATIC_BAND"]
    assert c["FLAT"] and c["BACKBONE_MODE"] == tk.BACKBONE_PLANES and c["ROLE"] == tk.ROLE_BOTH
    assert plan.skip_programs == 2 * 640
    # 4 vectors of 8 fp16 per thread; programs x tile covers the backbone exactly once
    assert plan.backbone_elements_per_program == 32 * 8 * 4
    assert plan.backbone_programs * plan.backbone_elements_per_program == 2 * 1280 * 32 * 32
    assert plan.grid == (plan.skip_programs + plan.backbone_programs,)


def test_gpu_plan_for_tiny_planes_packs_planes_and_threshold_8_runs_loops():
    x = torch.empty(2, 1280, 8, 8, dtype=torch.float16, device="meta")
    plan = _plan(x, x, device_type="cuda")
    assert plan.constexprs["BLOCK_P"] == 16 and plan.constexprs["FLAT"]
    big = torch.empty(2, 640, 64, 64, dtype=torch.float16, device="meta")
    plan8 = _plan(big, big, threshold=8, device_type="cuda")
    assert not plan8.constexprs["STATIC_BAND"] and plan8.scalars["nx"] == plan8.scalars["ny"] == 16


@pytest.mark.parametrize("family,sweep,mode", [
    ("square8", 0, "BACKBONE_PLANES"),
    ("chunked_80x40", 1, "BACKBONE_PLANES"),
    ("channels_last", 0, "BACKBONE_CHANNELS_LAST"),
    ("channels_last_chunked", 2, "BACKBONE_CHANNELS_LAST"),
    ("strided", 0, "BACKBONE_STRIDED"),
    ("5d", 0, "BACKBONE_PLANES"),
])
def test_families_take_the_intended_paths(family, sweep, mode):
    """The shared families exercise the three skip paths and the three backbone addressing modes.

    SWEEP 0: plane in registers, 1: row chunks with one-hot moments, 2: row chunks with column sums.
    """
    x, h = make_inputs(family, torch.float32)
    plan = _plan(x, h, device_type="cuda")
    assert plan.constexprs["SWEEP"] == sweep
    assert plan.constexprs["BACKBONE_MODE"] == getattr(tk, mode)
    assert plan.constexprs["TRANSPOSE"] == (family == "channels_last")


@pytest.mark.parametrize("family", ["square8", "chunked_80x40", "channels_last", "nonpow2_12x20",
                                    "channels_last_chunked"])
@pytest.mark.parametrize("mask", ["box", "radial"])
def test_runtime_band_loops_match_oracle(family, mask, poisoned_outputs):
    """Bands past the unrolled size run the kernel's runtime loops (plane-in-registers and swept paths)."""
    x, h = make_inputs(family, torch.float32, seed=4)
    threshold = 4
    plan = _plan(x, h, threshold, mask)
    assert not plan.constexprs["STATIC_BAND"]
    out = fused_concat(x, h, 1.3, 0.2, threshold=threshold, mask=mask, backend="triton")
    assert_matches_oracle(out, oracle(x, h, 1.3, 0.2, threshold, mask=mask), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backbone_rounding_is_bitwise_torch(dtype):
    """The backbone is v * b in float32 rounded to nearest even: bit-identical to torch's own rounding."""
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 6, 8, 8, generator=gen) * 3).to(DEVICE, dtype)
    h = torch.randn(2, 2, 8, 8, generator=gen).to(DEVICE, dtype)
    b = torch.tensor(1.37, dtype=torch.float32)
    out = fused_concat(x, h, b, 0.5, threshold=1, backend="triton")
    expected = torch.cat([(x[:, :3].float() * b.to(DEVICE)).to(dtype), x[:, 3:]], dim=1)
    assert torch.equal(out[:, :6], expected)


def test_twiddle_table_holds_exact_residue_twiddles_and_zero_padding():
    """Entry (j, x) = cos / sin(2 pi kx x / W) for kx = kx0 + j, zero on the padding past W (and H)."""
    x = torch.empty(1, 1, 6, 10)
    spec = make_spec(x, x, threshold=2)
    band = spec.band
    table_shape = (16, 8, 6, 10, False)
    table = tb.twiddle_table(band, table_shape, torch.device("cpu")).double()
    nx, ny = band.nx, band.ny
    cos_x = table[: nx * 16].view(nx, 16)
    sin_y = table[2 * nx * 16 + ny * 8:].view(ny, 8)
    for j in range(nx):
        kx = band.kx0 + j
        for col in range(16):
            want = math.cos(2 * math.pi * kx * col / 10) if col < 10 else 0.0
            assert cos_x[j, col].item() == pytest.approx(want, abs=1e-7)
    for i in range(ny):
        ky = band.ky0 + i
        for row in range(8):
            want = math.sin(2 * math.pi * ky * row / 6) if row < 6 else 0.0
            assert sin_y[i, row].item() == pytest.approx(want, abs=1e-7)


def test_plan_and_table_are_cached_per_key():
    """A repeated call reuses its launch plan and twiddle table (issue 15: a small Python launch path): the
    op's bound runner holds the plan, so a call with other factor values computes none."""
    x, h = make_inputs("odd7x5", torch.float32)
    fused_concat(x, h, 1.2, 0.5, backend="triton")
    info, tables = tb.launch_plan.cache_info(), len(tb._TABLES)
    fused_concat(x.clone(), h.clone(), 1.4, 0.3, backend="triton")
    again = tb.launch_plan.cache_info()
    assert (again.hits, again.misses) == (info.hits, info.misses)
    assert len(tb._TABLES) == tables


def test_launch_plans_differ_only_by_what_the_kernel_sees():
    """Same shapes and strides, other b/s values: one plan; another layout: another plan."""
    x, h = make_inputs("square8", torch.float32)
    assert _plan(x, h) is _plan(x, h)
    xc, hc = x.contiguous(memory_format=torch.channels_last), h.contiguous(memory_format=torch.channels_last)
    assert _plan(xc, hc) is not _plan(x, h)
