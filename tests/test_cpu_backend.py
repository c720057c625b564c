"""The "cpu" backend (csrc/freeu_cpu.cpp): what the shared matrix does not cover.

The shared test matrix (test_fused_concat, test_variants, test_errors, test_properties, ...) runs this
backend like every other one whenever its library is built. Here: that CI did build it, every compiled
instruction-set copy of the kernels against the oracle, and results that do not depend on the number
of threads.
"""

from __future__ import annotations

import os

import pytest
import torch

import freeu_kernels
from conftest import assert_matches_oracle, oracle
from freeu_kernels import fused_concat
from freeu_kernels.backends import cpu_backend
from freeu_kernels.spec import make_spec

needs_library = pytest.mark.skipif(cpu_backend.load_error() is not None,
                                   reason=f"CPU kernel library not built ({cpu_backend.load_error()})")

ISAS = ("baseline", "x86-64-v3", "x86-64-v4")


def use_isa(monkeypatch, isa: str) -> None:
    """Run the kernel copy compiled for ``isa``; skip where this processor does not run it."""
    monkeypatch.setenv(cpu_backend.ENV_ISA, isa)
    if cpu_backend.isa() != isa:
        pytest.skip(f"this processor does not run the {isa} copy")


def test_library_was_built_where_ci_expects_it():
    """.ci/run sets FREEU_KERNELS_EXPECT_CPU_KERNEL=1: there the backend must not silently go missing."""
    if os.environ.get("FREEU_KERNELS_EXPECT_CPU_KERNEL") != "1":
        pytest.skip("FREEU_KERNELS_EXPECT_CPU_KERNEL is not set")
    assert cpu_backend.load_error() is None
    assert freeu_kernels.available_backends("cpu")[0] == "cpu"


@needs_library
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,threshold,options", [
    ((2, 6, 24, 40), 1, {}),                                   # column strips of 16, 16 and a tail of 8
    ((1, 3, 1, 37), 1, dict(mask="radial")),                   # one frequency row
    ((1, 4, 20, 18), 3, dict(high_gain=1.2, version=2)),       # six rows: the generic row sweeps
    ((2, 5, 2, 16, 16), 2, dict(backbone_channels=(1, 4))),    # 5-D, one full strip
])
def test_every_instruction_set_copy_matches_oracle(monkeypatch, isa, dtype, shape, threshold, options):
    use_isa(monkeypatch, isa)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen).to(dtype)
    h = (torch.randn(shape, generator=gen) + 2.0).to(dtype)
    out = fused_concat(x, h, 1.3, 0.4, threshold=threshold, backend="cpu", **options)
    assert_matches_oracle(out, oracle(x, h, 1.3, 0.4, threshold, **options), dtype)


@needs_library
def test_unknown_isa_name_falls_back_to_the_widest(monkeypatch):
    monkeypatch.delenv(cpu_backend.ENV_ISA, raising=False)
    widest = cpu_backend.isa()
    monkeypatch.setenv(cpu_backend.ENV_ISA, "no-such-isa")
    assert cpu_backend.isa() == widest


@needs_library
@pytest.mark.parametrize("pool", ["openmp", "threads"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_result_does_not_depend_on_thread_count(monkeypatch, pool, dtype):
    """Each plane is computed by one thread, whole: 1, 2 or 3 threads give the same bits, in torch's
    OpenMP team (the default when torch's libgomp is loaded) or in threads of the kernel's own."""
    if pool == "threads":
        monkeypatch.setenv("FREEU_KERNELS_CPU_POOL", "threads")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, 12, 20, generator=gen).to(dtype)
    h = torch.randn(2, 9, 12, 20, generator=gen).to(dtype)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(fused_concat(x, h, 1.2, 0.3, backend="cpu"))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(results[0], r) for r in results[1:])


@needs_library
def test_float64_is_a_type_error_naming_torch_backend():
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"float64.*backend='torch'"):
        fused_concat(x, x, 1.2, 0.3, backend="cpu")


def test_cpu_backend_is_unavailable_for_other_devices():
    from freeu_kernels.backends import registry

    assert "CPU tensors" in registry.why_unavailable("cpu", torch.device("meta"))


@needs_library
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("band", [(0, 2, 0, 2), (1, 1, -1, 2), (-1, 2, 0, 3), (0, 1, 3, 1)],
                         ids=["rows0-1", "row1", "rows-1-0_cols0-2", "row0_col3"])
def test_strip_path_on_bands_no_mask_makes(monkeypatch, isa, band):
    """Frequency bands the published masks never produce (a last row with a non-zero sine, a lone
    non-zero row) against the torch backend given the same band: the kernel's general strip code."""
    from dataclasses import replace

    from freeu_kernels.backends.torch_backend import fused_concat_torch
    from freeu_kernels.spec import FrequencyBand, make_spec

    use_isa(monkeypatch, isa)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 20, 36, generator=gen)
    h = torch.randn(2, 4, 20, 36, generator=gen) + 1.0
    ky0, ny, kx0, nx = band
    spec = replace(make_spec(x, h), band=FrequencyBand(ky0, ny, kx0, nx, None))
    b, s = torch.tensor(1.3), torch.tensor(0.2)
    got = cpu_backend.fused_concat_cpu(x, h, b, s, spec)
    want = fused_concat_torch(x.double(), h.double(), b.double(), s.double(), replace(spec, dtype=torch.float64))
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


@needs_library
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("width", [64, 40, 8])
def test_bfloat16_scaling_rounds_like_torch_bit_for_bit(monkeypatch, isa, width):
    """The scaled window is x * b rounded once to nearest even, as torch rounds: equal bits, with
    infinities, denormals and values that round to the largest finite number among the inputs.
    Widths: whole 32-column word blocks, blocks plus a tail, a tail alone."""
    use_isa(monkeypatch, isa)
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(2, 4, 6, width, generator=gen).to(torch.bfloat16)
    special = torch.tensor([float("inf"), -float("inf"), 1e-39, -3e-40, 3.3e38, -0.0, 0.0, 1.0],
                           dtype=torch.bfloat16)
    x[0, 0, 0, : special.numel()] = special
    h = torch.randn(2, 3, 6, width, generator=gen).to(torch.bfloat16)
    b = 1.37
    out = fused_concat(x, h, b, 1.0, backend="cpu")
    expected = (x[:, :2].float() * torch.tensor(b, dtype=torch.float32)).to(torch.bfloat16)
    assert torch.equal(out[:, :2].view(torch.int16), expected.view(torch.int16))
    assert torch.equal(out[:, 2:4].view(torch.int16), x[:, 2:].view(torch.int16))


@needs_library
@pytest.mark.parametrize("isa", ISAS)
def test_bfloat16_nan_stays_in_its_plane_on_the_word_path(monkeypatch, isa):
    use_isa(monkeypatch, isa)
    x = torch.randn(1, 2, 4, 64).to(torch.bfloat16)
    h = torch.randn(1, 3, 4, 64).to(torch.bfloat16)
    x[0, 0, 1, 5] = float("nan")
    h[0, 1, 2, 33] = float("nan")
    out = fused_concat(x, h, 1.2, 0.5, backend="cpu")
    nan = torch.isnan(out)
    assert nan[0, 0].sum() == 1 and nan[0, 0, 1, 5]  # backbone: that element only
    assert nan[0, 3].all()  # the skip plane with the NaN: all of it, as the FFT reference
    assert not nan[0, 1].any() and not nan[0, 2].any() and not nan[0, 4].any()


@needs_library
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", [{}, dict(version=2, mask="radial", high_gain=1.1), dict(threshold=2)],
                         ids=["v1", "v2_radial_high_gain", "threshold2_planar"])
def test_channels_last_runs_across_channels(monkeypatch, isa, dtype, options):
    """channels_last with 1 or 2 frequencies per axis runs across channels: blocks of two vectors of
    bfloat16 words or one vector of channels (32/16 on v4, 16/8 on v3, 8/4 on the baseline), with a
    narrower last block on every copy (43 skip channels); 37 backbone channels, window and v2 map per
    pixel. threshold=2 (4 per axis) takes the planar kernels on strided planes instead."""
    use_isa(monkeypatch, isa)
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(2, 37, 5, 9, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    h = (torch.randn(2, 43, 5, 9, generator=gen) + 1.0).to(dtype).contiguous(memory_format=torch.channels_last)
    options = dict(options)
    threshold = options.pop("threshold", 1)
    out = fused_concat(x, h, 1.3, 0.4, threshold=threshold, backend="cpu", backbone_channels=(3, 30), **options)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_matches_oracle(out, oracle(x, h, 1.3, 0.4, threshold, backbone_channels=(3, 30), **options), dtype)


@needs_library
def test_auto_takes_the_kernel_where_it_was_measured_ahead(monkeypatch):
    """registry._cpu_kernel_wins: contiguous planes at least 16 wide or a multiple of 4 wide (the kernel
    runs narrow rows on a copy whose vector divides them), channels_last at any width; other narrow
    planes, and processors outside the measured x86-64 family, go to the torch backend."""
    from freeu_kernels.backends import registry

    def takes_kernel(width, channels_last=False):
        plane = torch.randn(1, 2, 6, width)
        return registry.suits("cpu", make_spec(plane, plane), channels_last)

    for width in range(2, 34, 2):
        assert takes_kernel(width) == (width >= 16 or width % 4 == 0), width
        assert takes_kernel(width, channels_last=True)
    monkeypatch.setattr(registry, "CPU_KERNEL_MEASURED_HERE", False)
    assert not takes_kernel(32) and not takes_kernel(32, channels_last=True)
    assert registry.suits("torch", make_spec(torch.randn(1, 2, 6, 32), torch.randn(1, 2, 6, 32)))


@needs_library
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [4, 8, 10, 12, 20])
def test_narrow_rows_on_the_copy_chosen_for_them(monkeypatch, dtype, width):
    """Unforced, rows narrower than 16 run the widest copy whose vector divides them (or the baseline)."""
    monkeypatch.delenv(cpu_backend.ENV_ISA, raising=False)
    gen = torch.Generator().manual_seed(19)
    x = torch.randn(2, 3, 7, width, generator=gen).to(dtype)
    h = (torch.randn(2, 5, 7, width, generator=gen) + 1.0).to(dtype)
    for options in ({}, dict(version=2, high_gain=1.1)):
        out = fused_concat(x, h, 1.3, 0.4, backend="cpu", **options)
        assert_matches_oracle(out, oracle(x, h, 1.3, 0.4, 1, **options), dtype)


def stack_references_per_copy(library) -> dict:
    """Instructions that address the stack (%rsp), summed over each kernel copy's functions (objdump -d)."""
    import re
    import subprocess

    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", str(library)], capture_output=True,
                             text=True, check=True).stdout
    counts, copy = {}, None
    for line in listing.splitlines():
        if line.endswith(">:"):  # a function's first line: which copy's namespace it is in
            match = re.search(r"[< ](isa_[a-z0-9_]+)::", line)
            copy = match.group(1) if match else None
        elif copy is not None and "(%rsp)" in line:
            counts[copy] = counts.get(copy, 0) + 1
    return counts


@needs_library
def test_narrower_copies_keep_their_vectors_in_registers():
    """Each copy's vectors are one register of its ISA. A vector wider than the registers (the AVX2 copy
    once used AVX-512-sized ones) is lowered through the stack: 56633 stack references in the AVX2 copy
    against 8847 in the AVX-512 one, and a kernel 3x to 11x slower; today about 9600 each."""
    import platform
    import shutil

    if shutil.which("objdump") is None or platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("needs objdump and an x86-64 build")
    if os.environ.get(cpu_backend.ENV_LIBRARY):
        pytest.skip(f"${cpu_backend.ENV_LIBRARY} names another build (e.g. tools/sanitize_cpu.sh's, not -O3)")
    counts = stack_references_per_copy(cpu_backend.library_path())
    if "isa_x86_64_v4" not in counts:
        pytest.skip("a build without the x86-64-v4/v3 copies (not GCC)")
    for narrower in ("isa_x86_64_v3", "isa_baseline"):
        assert counts[narrower] <= 1.5 * counts["isa_x86_64_v4"], counts
