"""The one test matrix every backend runs: backends, devices, dtypes, shape families and tolerances.

Without a CUDA device the Triton backend runs through its interpreter (TRITON_INTERPRET=1, set here
before anything imports Triton), so CI exercises the real kernel on CPU tensors.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

import freeu_kernels  # noqa: E402
from freeu_kernels import fused_concat_reference  # noqa: E402

# The property tests draw the same examples on every run unless HYPOTHESIS_PROFILE=explore: a CI run
# must not pass or fail by the luck of the draw. Run the explore profile to search for new failures.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = freeu_kernels.available_backends(DEVICE)

# Per-dtype tolerance against the float64 FFT oracle: |out - ref| <= atol * max(|ref|, inputs) + rtol * |ref|.
# float32 arithmetic lands near 1e-7; low-precision outputs are dominated by their own rounding.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=8e-3),
}


def backend_dtypes(backend: str):
    """dtypes a backend supports: float64 only on the torch backend."""
    base = [torch.float32, torch.bfloat16, torch.float16]
    return base + [torch.float64] if backend == "torch" else base


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return t.contiguous(memory_format=fmt)


def _strided_view(shape, generator, dtype, device) -> torch.Tensor:
    """A non-contiguous view of a larger tensor: every other channel, a cropped and strided plane."""
    n, c, height, width = shape
    big = torch.randn(n, 2 * c + 1, height + 3, 2 * width + 1, generator=generator)
    return big.to(device=device, dtype=dtype)[:, 1::2, 2 : 2 + height, ::2][..., :width]


# name -> (x shape, Ch, transform). Chosen to cover: odd sizes, H = 1, 1x1, Cx != Ch (and odd Cx),
# non-power-of-two planes, 5-D, channels_last, strided views, many tiny planes per Triton program,
# and a plane large enough for the two-sweep (chunked) Triton path.
SHAPE_FAMILIES = {
    "square8": ((2, 4, 8, 8), 4, None),
    "odd7x5": ((1, 3, 7, 5), 5, None),
    "h1": ((2, 2, 1, 9), 3, None),
    "1x1": ((2, 3, 1, 1), 2, None),
    "cx_ne_ch": ((1, 5, 6, 6), 2, None),
    "nonpow2_12x20": ((1, 2, 12, 20), 3, None),
    "5d": ((1, 2, 3, 6, 10), 3, None),
    "channels_last": ((2, 4, 6, 10), 6, "channels_last"),
    "strided": ((2, 3, 7, 9), 2, "strided"),
    "many_tiny": ((2, 24, 4, 4), 18, None),
    "chunked_80x40": ((1, 1, 80, 40), 1, None),
    "separable_24x40": ((1, 2, 24, 40), 3, None),  # past the torch backend's Kronecker size, Cx > 1
    # channels_last planes too large for one Triton program's registers: the swept channels_last paths
    "channels_last_chunked": ((1, 3, 40, 24), 10, "channels_last"),
}


def make_inputs(family: str, dtype: torch.dtype, seed: int = 0, device=DEVICE):
    """x, h for a shape family: random normal data plus a per-channel offset (real features have DC)."""
    shape, skip_channels, transform = SHAPE_FAMILIES[family]
    gen = torch.Generator().manual_seed(seed)
    h_shape = (shape[0], skip_channels) + tuple(shape[2:])
    if transform == "strided":
        return _strided_view(shape, gen, dtype, device), _strided_view(h_shape, gen, dtype, device)
    x, h = torch.randn(shape, generator=gen), torch.randn(h_shape, generator=gen)
    h = h + torch.randn(h_shape[:2] + (1,) * (len(shape) - 2), generator=gen)
    if transform == "channels_last":
        x, h = _channels_last(x), _channels_last(h)
    return x.to(device=device, dtype=dtype), h.to(device=device, dtype=dtype)


def oracle(x, h, b, s, threshold=1, **options):
    """The float64 FFT reference on the CPU."""
    as64 = lambda t: t.detach().to(device="cpu", dtype=torch.float64)  # noqa: E731
    b = float(b) if not isinstance(b, torch.Tensor) else b.double().cpu()
    s = float(s) if not isinstance(s, torch.Tensor) else s.double().cpu()
    return fused_concat_reference(as64(x), as64(h), b, s, threshold, **options)


def assert_matches_oracle(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, input_scale: float = 0.0) -> None:
    """Compare with the per-dtype tolerance; NaN never passes.

    The absolute tolerance scales with the larger of the output's and ``input_scale`` (the inputs'
    largest magnitude, where the caller knows it): with s = 0 the filter can cancel a plane to exactly
    zero in float64 while any float32 evaluation leaves rounding residue of the inputs' size.
    """
    tol = TOLERANCES[dtype]
    got = out.detach().to(device="cpu", dtype=torch.float64)
    assert got.shape == ref.shape
    assert not torch.isnan(got).any(), "output has NaN (an element was not written, or the math broke)"
    scale = max(ref.abs().max().item() if ref.numel() else 0.0, input_scale)
    torch.testing.assert_close(got, ref, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1e-30))


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every backend's output buffer starts as NaN, so an element no kernel wrote fails the comparison."""
    import importlib

    from freeu_kernels import spec as spec_module

    original = spec_module.allocate_output

    def poisoned(x, skip_channels):
        out = original(x, skip_channels)
        return out.fill_(float("nan"))

    for name in ("torch_backend", "triton_backend", "c_abi"):
        try:
            module = importlib.import_module(f"freeu_kernels.backends.{name}")
        except Exception:  # the module's own optional dependency is missing
            continue
        if hasattr(module, "allocate_output"):
            monkeypatch.setattr(module, "allocate_output", poisoned)
    return poisoned
