"""What outlives one call never changes a later one: the op's per-call caches (each case primes a cache,
then makes a call that differs in only what the key might miss, and compares it with a cold computation)
and the tensors a schedule keeps (made in one grad mode, used in another)."""

from __future__ import annotations

import pytest
import torch

import freeu_kernels
from freeu_kernels import fused_concat_reference
from freeu_kernels import ops as freeu_ops
from freeu_kernels.spec import make_spec

X = torch.randn(1, 4, 8, 16)
H = torch.randn(1, 4, 8, 16)


def test_backend_choice_is_per_device_type(monkeypatch):
    """The automatic choice for CUDA tensors is not the one cached for CPU tensors of the same spec (the
    spec holds no device): after a CPU call, a CUDA call must still get the CUDA preference's first."""
    monkeypatch.setattr(freeu_ops, "_BACKEND_CACHE", {})
    monkeypatch.delenv(freeu_ops.ENV_BACKEND, raising=False)
    spec = make_spec(X, H)
    cuda = torch.device("cuda")
    cold = freeu_ops.resolve_backend("auto", cuda, spec)  # no CUDA device needed: the choice is by type
    freeu_ops._backend_for(spec, "auto", torch.device("cpu"), False)
    assert freeu_ops._backend_for(spec, "auto", cuda, False) == cold.value


def test_factor_sign_of_zero_is_kept():
    """b = -0.0 after b = 0.0 gives the reference's signed zeros, not the memoised +0.0 factor's."""
    freeu_kernels.fused_concat(X, H, 0.0, 0.7, backend="torch")
    out = freeu_kernels.fused_concat(X, H, -0.0, 0.7, backend="torch")
    reference = fused_concat_reference(X, H, -0.0, 0.7)
    assert torch.equal(torch.signbit(out[:, :2]), torch.signbit(reference[:, :2]))
    assert torch.signbit(out[:, :2]).any() and not torch.signbit(out[:, :2]).all()


def test_factor_first_built_under_inference_mode_allows_backward():
    """A Python factor first seen under inference_mode is memoised; a later call with autograd saves it
    for backward, which an inference tensor would refuse."""
    b, s = 1.0 + 2.0 ** -10, 0.5 - 2.0 ** -11  # values no other test uses, so this call builds the tensors
    with torch.inference_mode():
        freeu_kernels.fused_concat(X, H, b, s, backend="torch")
    x = X.clone().requires_grad_(True)
    freeu_kernels.fused_concat(x, H, b, s, backend="torch").sum().backward()
    expected = torch.ones_like(X)
    expected[:, :2] = b
    torch.testing.assert_close(x.grad, expected)


def test_factor_first_built_under_a_meta_default_device_stays_on_the_cpu():
    """A first call under ``with torch.device("meta")`` must not memoise a meta factor: the next CPU call
    with that value dispatched to the fake kernel and returned its uninitialised output."""
    b = 1.0 + 2.0 ** -8
    with torch.device("meta"):
        freeu_kernels.fused_concat(X.to("meta"), H.to("meta"), b, 0.7, backend="torch")
    torch.testing.assert_close(freeu_kernels.fused_concat(X, H, b, 0.7), fused_concat_reference(X, H, b, 0.7))


def test_factor_first_built_under_fake_tensor_mode_is_not_memoised():
    """A first call under FakeTensorMode (shape inference, export) must not memoise a fake factor for
    later eager calls, nor hand a memoised real one to the mode (make_fx's fake tracing)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    b = 1.0 + 2.0 ** -7
    with FakeTensorMode() as mode:
        freeu_kernels.fused_concat(mode.from_tensor(X), mode.from_tensor(H), b, 0.7)
    expected = fused_concat_reference(X, H, b, 0.7)
    torch.testing.assert_close(freeu_kernels.fused_concat(X, H, b, 0.7), expected)
    traced = make_fx(lambda x, h: freeu_kernels.fused_concat(x, h, b, 0.7), tracing_mode="fake")(X, H)
    torch.testing.assert_close(traced(X, H), expected)


def test_meta_factor_with_real_inputs_is_an_error_not_garbage():
    """Meta outranks CPU in dispatch: the raw op with a meta b reached the fake kernel, which returned the
    uninitialised output; it must reject the factor's device like the real kernel does."""
    with pytest.raises(ValueError, match="b must be on the CPU or on the inputs' device"):
        torch.ops.freeu.fused_concat(X, H, torch.tensor(1.2, device="meta"), torch.tensor(0.7))


def test_schedule_made_under_inference_mode_takes_set_outside_it():
    """FreeUSchedule.set writes its numbers in place; a schedule built inside inference_mode held an
    inference tensor, which refuses that outside it."""
    with torch.inference_mode():
        schedule = freeu_kernels.FreeUSchedule(0.2, 0.8)
    schedule.set(start=0.3)
    assert (schedule.start, schedule.stop) == pytest.approx((0.3, 0.8))


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # the per-sample fallback, expected
@pytest.mark.parametrize("version", [1, 2])
def test_vmap_and_jacfwd_match_the_reference(version):
    """torch.func.vmap over fused_concat (the op's own error message points users there) and jacfwd,
    which vmaps the forward-mode rule, give the reference's per-sample results."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 1, 4, 4, 6, generator=gen, dtype=torch.float64)
    h = torch.randn(3, 1, 2, 4, 6, generator=gen, dtype=torch.float64)
    ours = torch.func.vmap(lambda a, c: freeu_kernels.fused_concat(a, c, 1.3, 0.6, version=version, backend="torch"))
    expected = torch.stack([fused_concat_reference(x[i], h[i], 1.3, 0.6, version=version) for i in range(3)])
    torch.testing.assert_close(ours(x, h), expected, rtol=1e-10, atol=1e-12)
    small = x[0, :, :2, :2, :3].contiguous()
    jacobian = torch.func.jacfwd(lambda a: freeu_kernels.fused_concat(a, h[0, :, :, :2, :3], 1.3, 0.6,
                                                                      version=version, backend="torch"))(small)
    reference = torch.func.jacfwd(lambda a: fused_concat_reference(a, h[0, :, :, :2, :3], 1.3, 0.6,
                                                                   version=version))(small)
    assert reference.abs().max() > 0
    torch.testing.assert_close(jacobian, reference, rtol=1e-10, atol=1e-12)
