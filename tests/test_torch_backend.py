"""The "torch" backend (freeu_kernels/backends/torch_backend.py): what the shared matrix does not cover.

Here: the number of aten ops one call issues (a fixed budget whatever the shape and dtype: on an
accelerator each op is a kernel launch, on the CPU a parallel region), output bits that do not depend on
torch.set_num_threads (its low-rank path and the FFT path that large thresholds take on every CPU
backend), and frequency bands given per axis (unequal ny, nx) against an FFT written out here.
"""

from __future__ import annotations

import collections
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from freeu_kernels import fused_concat
from freeu_kernels.backends.torch_backend import fused_concat_torch
from freeu_kernels.spec import FrequencyBand, make_spec

# Ops that only describe memory (views, allocation, reading a host scalar): no kernel, no parallel region.
METADATA_OPS = {"view", "_unsafe_view", "t", "transpose", "expand", "slice", "select", "alias", "as_strided",
                "unsqueeze", "squeeze", "permute", "empty", "empty_like", "empty_strided", "detach",
                "_local_scalar_dense"}
COMPUTE_OP_BUDGET = 16  # the aim is <= 20; today 11 to 15


class CountOps(TorchDispatchMode):
    """Counts every aten op dispatched while active, by name."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def compute(self) -> collections.Counter:
        return collections.Counter({k: v for k, v in self.ops.items() if k not in METADATA_OPS})


def torch_backend_call(x, h, threshold=1, **options):
    """A zero-argument call of fused_concat_torch on a validated spec, as the registry makes it (b, s 0-d
    tensors), and the spec."""
    spec = make_spec(x, h, threshold, **options)
    factor = torch.float64 if x.dtype == torch.float64 else torch.float32
    b, s = torch.tensor(1.3, dtype=factor), torch.tensor(0.4, dtype=factor)
    scale_map = None
    if spec.version == 2:
        scale_map = torch.rand((x.shape[0],) + tuple(x.shape[2:]), dtype=torch.float32) + 0.5
    return (lambda: fused_concat_torch(x, h, b, s, spec, scale_map)), spec


def counted_ops(shape, dtype, threshold, channels_last, version=1):
    """The compute ops of one call (after a first call built the cached tables), and the call's spec."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen).to(dtype)
    h = torch.randn(shape, generator=gen).to(dtype)
    if channels_last:
        x, h = (t.contiguous(memory_format=torch.channels_last) for t in (x, h))
    call, spec = torch_backend_call(x, h, threshold, backbone_channels=(0, shape[1] // 2), version=version)
    call()
    with CountOps() as counter:
        call()
    return counter.compute(), spec


# Small and SDXL-like planes: the Kronecker form (<= 256 elements), the separable form, 5-D video.
SHAPES = [(1, 4, 8, 8), (2, 64, 16, 16), (2, 40, 32, 32), (1, 6, 64, 48), (1, 3, 2, 20, 24)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("threshold", [1, 3, 12], ids=["t1", "t3", "t12_fft"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_ops_per_call_are_few_and_do_not_grow_with_the_shape(dtype, threshold, channels_last):
    """A fixed budget of compute ops per call; per path, the same ops whatever the shape, but for the copy
    a layout without a rows view costs (channels_last planes of more than one row of channels)."""
    seen = {}
    for shape in SHAPES:
        if channels_last and len(shape) == 5:
            continue
        ops, spec = counted_ops(shape, dtype, threshold, channels_last)
        assert sum(ops.values()) <= COMPUTE_OP_BUDGET, (shape, dict(ops))
        copies = ops.pop("clone", 0) + ops.pop("copy_", 0)
        assert copies <= 3, (shape, copies)
        path = "fft" if spec.uses_fft_fallback else "kronecker" if spec.plane_size <= 256 else "separable"
        seen.setdefault(path, set()).add(tuple(sorted(ops.items())))
    for path, op_sets in seen.items():
        assert len(op_sets) == 1, f"{path}: the ops per call depend on the shape: {op_sets}"


def test_ops_per_call_with_the_version_2_map():
    ops, _ = counted_ops((2, 64, 32, 32), torch.bfloat16, 1, False, version=2)
    assert sum(ops.values()) <= COMPUTE_OP_BUDGET, dict(ops)


@pytest.fixture
def restore_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("backend,threshold", [("torch", 1), ("torch", 3), ("torch", 12), ("cpu", 12)],
                         ids=["torch-t1", "torch-t3", "torch-t12_fft", "cpu-t12_fft"])
def test_output_bits_do_not_depend_on_the_thread_count(restore_threads, backend, dtype, threshold):
    """1 and 2 threads, twice each, give the same bits. Sizes where MKL's GEMM with a beta term and its
    wide (small-M) GEMM both change the last bit with the thread count; t12 takes the FFT path on
    every CPU backend (the cpu kernel's own paths: tests/test_cpu_backend.py)."""
    from freeu_kernels import available_backends

    if backend not in available_backends("cpu"):
        pytest.skip(f"backend {backend!r} is not available")
    if backend == "cpu" and dtype == torch.float64:
        pytest.skip("float64 is the torch backend's alone")
    gen = torch.Generator().manual_seed(7)
    for shape, layout in [((1, 8, 96, 80), torch.contiguous_format), ((2, 24, 64, 64), torch.channels_last)]:
        x = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=layout)
        h = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=layout)
        results = []
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            results.append(fused_concat(x, h, 1.3, 0.4, threshold=threshold, high_gain=0.9, backend=backend))
        for other in results[1:]:
            assert torch.equal(results[0], other), (shape, layout)


def fft_oracle_skip(h: torch.Tensor, band: FrequencyBand, s: float, high_gain: float) -> torch.Tensor:
    """Re(ifft2(G fft2(h))) in float64, G = s on the band's (ky, kx) grid (signed, modulo the plane), g_hi
    elsewhere: the definition of the filter, written independently of the backends."""
    height, width = h.shape[-2:]
    gains = torch.full((height, width), high_gain, dtype=torch.float64)
    for ky in range(band.ky0, band.ky0 + band.ny):
        for kx in range(band.kx0, band.kx0 + band.nx):
            inside = band.radius_sq is None or ky * ky + kx * kx < band.radius_sq
            if inside:
                gains[ky % height, kx % width] = s
    return torch.fft.ifft2(torch.fft.fft2(h.double()) * gains).real


@pytest.mark.parametrize("band", [(0, 1, -2, 4), (-3, 6, 0, 2), (-1, 2, -8, 17), (-9, 18, -1, 3),
                                  (-2, 4, -3, 7, 10)],
                         ids=["1x4", "6x2", "2x17_fft", "18x3_fft", "4x7_radial"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unequal_bands_per_axis_match_the_fft_definition(band, dtype):
    """The backend reads spec.band only: ny != nx (low-rank and FFT paths) as given, never spec.threshold."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 40, 36, generator=gen, dtype=torch.float64).to(dtype)
    h = torch.randn(2, 4, 40, 36, generator=gen, dtype=torch.float64).to(dtype)
    ky0, ny, kx0, nx = band[:4]
    frequency_band = FrequencyBand(ky0, ny, kx0, nx, band[4] if len(band) > 4 else None)
    spec = replace(make_spec(x, h), band=frequency_band)
    factor = torch.float64 if dtype == torch.float64 else torch.float32
    out = fused_concat_torch(x, h, torch.tensor(1.3, dtype=factor), torch.tensor(0.4, dtype=factor), spec)
    want = fft_oracle_skip(h, frequency_band, 0.4, 1.0)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out[:, 3:].double(), want, rtol=tol, atol=tol * want.abs().max().item())
