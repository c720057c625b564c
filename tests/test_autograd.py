"""Autograd: gradcheck in float64 (v1 and v2), opcheck, and an inference path that saves nothing."""

from __future__ import annotations

import pytest
import torch

from conftest import BACKENDS, make_inputs
from freeu_kernels import fused_concat, fused_concat_reference


def _inputs64(shape=(2, 3, 5, 6), skip=2):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    h = torch.randn((shape[0], skip) + shape[2:], generator=gen, dtype=torch.float64, requires_grad=True)
    return x, h


@pytest.mark.parametrize(
    "options",
    [dict(), dict(threshold=2, mask="radial", high_gain=1.1), dict(version=2), dict(version=2, backbone_channels=(1, 3))],
    ids=["v1", "v1_radial", "v2", "v2_window"],
)
def test_gradcheck_float64(options):
    x, h = _inputs64()
    assert torch.autograd.gradcheck(lambda a, c: fused_concat(a, c, 1.3, 0.4, backend="torch", **options), (x, h))


def test_gradcheck_5d_v2():
    x, h = _inputs64((1, 2, 2, 4, 3), 2)
    assert torch.autograd.gradcheck(lambda a, c: fused_concat(a, c, 1.3, 0.4, version=2, backend="torch"), (x, h))


@pytest.mark.parametrize("version", [1, 2])
def test_gradient_matches_autograd_through_the_reference(version):
    """The registered backward equals autograd through the FFT reference (an independent derivation)."""
    x, h = _inputs64((2, 4, 7, 5), 3)
    g = torch.randn(2, 7, 7, 5, dtype=torch.float64)
    ours = torch.autograd.grad((fused_concat(x, h, 1.3, 0.4, version=version) * g).sum(), (x, h))
    ref = torch.autograd.grad((fused_concat_reference(x, h, 1.3, 0.4, version=version) * g).sum(), (x, h))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_on_each_backend(backend):
    """float32 gradients of every backend agree with the float64 torch backend."""
    x, h = make_inputs("odd7x5", torch.float32, seed=2)
    x.requires_grad_(True)
    h.requires_grad_(True)
    out = fused_concat(x, h, 1.3, 0.4, backend=backend)
    g = torch.randn_like(out)
    gx, gh = torch.autograd.grad((out * g).sum(), (x, h))
    x64, h64 = x.detach().double().requires_grad_(True), h.detach().double().requires_grad_(True)
    rx, rh = torch.autograd.grad((fused_concat(x64, h64, 1.3, 0.4, backend="torch") * g.double()).sum(), (x64, h64))
    torch.testing.assert_close(gx.double(), rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh.double(), rh, rtol=1e-5, atol=1e-5)


def test_opcheck():
    x, h = make_inputs("odd7x5", torch.float32)
    b, s = torch.tensor(1.3), torch.tensor(0.4)
    for kwargs in (dict(threshold=1), dict(threshold=2, mask="radial", high_gain=1.1), dict(version=2)):
        torch.library.opcheck(torch.ops.freeu.fused_concat.default, (x, h, b, s), dict(kwargs, backend="torch"))
    x64, h64 = x.double().requires_grad_(True), h.double().requires_grad_(True)
    torch.library.opcheck(
        torch.ops.freeu.fused_concat.default, (x64, h64, b.double(), s.double()), dict(version=2, backend="torch")
    )


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend not available")
def test_opcheck_triton():
    x, h = make_inputs("square8", torch.float32)
    torch.library.opcheck(
        torch.ops.freeu.fused_concat.default, (x, h, torch.tensor(1.3), torch.tensor(0.4)), dict(backend="triton")
    )


def _saved_tensor_sizes(fn):
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


def test_inference_saves_nothing():
    x, h = make_inputs("square8", torch.float32)
    x.requires_grad_(True)
    with torch.no_grad():
        assert fused_concat(x, h, 1.3, 0.4).grad_fn is None
    with torch.inference_mode():
        out = fused_concat(x.detach(), h, 1.3, 0.4)
        assert out.grad_fn is None and out.is_inference()
    # Version 1 is linear: even with grad enabled only the two 0-d factors are kept for backward.
    assert all(n <= 1 for n in _saved_tensor_sizes(lambda: fused_concat(x, h, 1.3, 0.4)))
    assert max(_saved_tensor_sizes(lambda: fused_concat(x, h, 1.3, 0.4, version=2))) == x.numel()


def test_no_grad_for_factors():
    """b and s are schedule constants: gradients flow to x and h only."""
    x, h = make_inputs("square8", torch.float32)
    x.requires_grad_(True)
    b = torch.tensor(1.3, requires_grad=True)
    fused_concat(x, h, b, 0.4).sum().backward()
    assert x.grad is not None and b.grad is None
