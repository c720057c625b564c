"""fused_concat's eager fast path (ops.py): a repeated plain call runs its bound plan without the dispatcher.

The fast path must be invisible: the same bits as the dispatcher's path (torch.ops.freeu.fused_concat) on
every backend and option, never taken where the dispatcher would do something (modes, transforms,
tracers, the profiler, gradients, tensor subclasses, tensors with extra dispatch keys such as negative
views), and never a way past the checks (a cached key must not admit an input the full path rejects).
Whether it was taken is observed by replacing the cached plan with a spy (counted, not timed).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from freeu_kernels import fused_concat, fused_concat_reference
from freeu_kernels import ops as freeu_ops

from conftest import BACKENDS, assert_matches_oracle, make_inputs, oracle

FAST_BACKENDS = [b for b in BACKENDS if b in ("torch", "cpu", "triton", "cuda")]


class _Spy:
    """Stands in for a cached _CallPlan and counts the fast path's calls through it."""

    def __init__(self, plan):
        self.plan, self.calls = plan, 0

    def forward(self, *args):
        self.calls += 1
        return self.plan.forward(*args)


def _spy_on(monkeypatch, x, h, backend, **options) -> _Spy:
    """Prime the fast path's entry for this call and replace it with a spy."""
    fused_concat(x, h, 1.25, 0.5, backend=backend, **options)
    key = freeu_ops._eager_key(x, h, options.get("threshold", 1), options.get("version", 1),
                               options.get("backbone_channels"), options.get("high_gain", 1.0),
                               options.get("mask", "box"), backend)
    assert key in freeu_ops._EAGER_CALLS, "a validated plain call must prime the fast path"
    spy = _Spy(freeu_ops._EAGER_CALLS[key])
    monkeypatch.setitem(freeu_ops._EAGER_CALLS, key, spy)
    return spy


def _op_options(x, h, backend, **options):
    """The schema's keyword arguments the wrapper passes for these options (its own translation)."""
    spec = freeu_ops.cached_spec(x, h, options.get("threshold", 1), options.get("version", 1),
                                 options.get("backbone_channels"), options.get("high_gain", 1.0),
                                 options.get("mask", "box"))
    return freeu_ops._op_options(spec, options.get("backbone_channels"), backend)


CASES = [
    ("square8", torch.float32, dict()),
    ("odd7x5", torch.bfloat16, dict(threshold=(1, 2))),
    ("channels_last", torch.float16, dict(version=2)),
    ("cx_ne_ch", torch.float32, dict(backbone_channels=[(0, 1), (3, 5)], high_gain=1.5)),
    ("strided", torch.float32, dict(mask="radial", threshold=2)),
    ("5d", torch.bfloat16, dict(version=2, backbone_channels=(1, 2))),
]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("family,dtype,options", CASES, ids=[c[0] + "-" + str(c[1])[6:] for c in CASES])
def test_fast_path_is_taken_and_matches_the_dispatcher_bit_for_bit(monkeypatch, backend, family, dtype, options):
    x, h = make_inputs(family, dtype)
    spy = _spy_on(monkeypatch, x, h, backend, **options)
    b, s = torch.tensor(1.25), torch.tensor(0.5)
    fast = fused_concat(x, h, b, s, backend=backend, **options)
    assert spy.calls == 1
    slow = torch.ops.freeu.fused_concat(x, h, b, s, **_op_options(x, h, backend, **options))
    assert fast.stride() == slow.stride()
    assert torch.equal(fast, slow)
    assert_matches_oracle(fast, oracle(x, h, 1.25, 0.5, **options), dtype)


class _Subclass(torch.Tensor):
    pass


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _not_fast_cases():
    """(name, context manager factory, input transform) for calls the dispatcher must see."""
    import contextlib

    none = contextlib.nullcontext
    return [
        ("dispatch_mode", _Passthrough, None),
        ("function_mode", lambda: torch.device("cpu"), None),
        ("profiler", lambda: torch.autograd.profiler.profile(), None),
        ("negative_view", none, lambda t: torch._neg_view(t)),
        ("subclass", none, lambda t: t.as_subclass(_Subclass)),
        ("requires_grad", none, lambda t: t.clone().requires_grad_(True)),
    ]


@pytest.mark.parametrize("backend", [b for b in FAST_BACKENDS if b != "triton"])
@pytest.mark.parametrize("name,context,transform", _not_fast_cases(), ids=[c[0] for c in _not_fast_cases()])
def test_fast_path_is_not_taken_where_the_dispatcher_acts(monkeypatch, backend, name, context, transform):
    """Each case gives the right output through the dispatcher: a negative view is read as its values
    (a raw-pointer kernel on the fast path would read the un-negated memory), a requires_grad input gets
    a gradient, the profiler records the op."""
    x, h = make_inputs("square8", torch.float32)
    spy = _spy_on(monkeypatch, x, h, backend)
    xin = x if transform is None else transform(x)
    with context() as active:
        out = fused_concat(xin, h, 1.25, 0.5, backend=backend)
    assert spy.calls == 0, name
    expected = fused_concat_reference(xin.detach().clone().double(), h.double(), 1.25, 0.5)
    torch.testing.assert_close(out.detach().double(), expected, rtol=2e-5, atol=2e-5)
    if name == "requires_grad":
        out.sum().backward()
        assert xin.grad is not None
    if name == "profiler":
        assert any("freeu::fused_concat" in event.name for event in active.function_events)


@pytest.mark.parametrize("backend", [b for b in FAST_BACKENDS if b != "triton"])
def test_fast_path_skips_transforms_and_forward_ad(monkeypatch, backend):
    x, h = make_inputs("square8", torch.float32)
    spy = _spy_on(monkeypatch, x, h, backend)
    tangent = torch.ones_like(x)
    _, jvp_out = torch.func.jvp(lambda a: fused_concat(a, h, 1.25, 0.5, backend=backend), (x,), (tangent,))
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual = fused_concat(fwAD.make_dual(x, tangent), h, 1.25, 0.5, backend=backend)
        forward_tangent = fwAD.unpack_dual(dual).tangent
    assert spy.calls == 0
    expected = torch.zeros_like(jvp_out)
    expected[:, :4] = 1.0
    expected[:, :2] = 1.25
    assert torch.equal(jvp_out, expected) and torch.equal(forward_tangent, expected)


@pytest.mark.parametrize("backend", [b for b in FAST_BACKENDS if b != "triton"])
def test_fast_path_under_no_grad_and_inference_mode(monkeypatch, backend):
    """A requires_grad input under no_grad, and an inference-mode call, take the fast path (nothing to
    record), with the dispatcher's results: no graph, an inference tensor under inference_mode."""
    x, h = make_inputs("square8", torch.float32)
    spy = _spy_on(monkeypatch, x, h, backend)
    leaf = x.clone().requires_grad_(True)
    with torch.no_grad():
        out = fused_concat(leaf, h, 1.25, 0.5, backend=backend)
    with torch.inference_mode():
        inference = fused_concat(x, h, 1.25, 0.5, backend=backend)
    assert spy.calls == 2
    assert out.grad_fn is None and not out.requires_grad
    assert inference.is_inference()
    assert torch.equal(out, inference)


@pytest.mark.parametrize("backend", [b for b in FAST_BACKENDS if b != "triton"])
def test_factor_requiring_grad_takes_the_dispatcher_and_records_nothing(monkeypatch, backend):
    """Gradients do not flow to b and s: through either path the output has no graph."""
    x, h = make_inputs("square8", torch.float32)
    spy = _spy_on(monkeypatch, x, h, backend)
    b = torch.tensor(1.25, requires_grad=True)
    out = fused_concat(x, h, b, torch.tensor(0.5), backend=backend)
    assert spy.calls == 0 and out.grad_fn is None
    with torch.no_grad():
        fused_concat(x, h, b, torch.tensor(0.5), backend=backend)
    assert spy.calls == 1
    negative_factor = torch._neg_view(torch.tensor(-1.25))  # reads as 1.25 only through its dispatch keys
    torch.testing.assert_close(fused_concat(x, h, negative_factor, 0.5, backend=backend), out)
    assert spy.calls == 1


@pytest.mark.parametrize("backend", [b for b in FAST_BACKENDS if b != "triton"])
@pytest.mark.parametrize("bad", [
    dict(threshold=True), dict(threshold=1.0), dict(version=1.0), dict(version=True), dict(mask="Box"),
    dict(backbone_channels=(0, 9)), dict(high_gain=float("inf")), dict(b=float("nan")), dict(s=float("inf")),
    dict(b=10 ** 400), dict(backend="no-such-backend"),
], ids=lambda d: "-".join(f"{k}={v!r}" for k, v in d.items()))
def test_a_cached_call_never_admits_an_input_the_full_path_rejects(monkeypatch, backend, bad):
    """Each bad call differs from a cached good one only in a value that compares or hashes equal to the
    good one's (True == 1 == 1.0) or in one the full path checks: it must raise as on a cold cache."""
    x, h = make_inputs("square8", torch.float32)
    _spy_on(monkeypatch, x, h, backend)
    call = dict(b=1.25, s=0.5, backend=backend)
    call.update(bad)
    with pytest.raises((ValueError, TypeError)):
        fused_concat(x, h, call.pop("b"), call.pop("s"), **call)


@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="CPU kernel library not built")
def test_cpu_fast_path_follows_the_thread_count(threads_restored, monkeypatch):
    """The bound CPU runner passes the kernel torch.get_num_threads of each call (the binding does not
    freeze it); the output bits do not depend on it (each plane is one thread's work)."""
    from freeu_kernels.backends import c_abi

    passed = []
    original_run = c_abi._LaunchPlan.run

    def recording_run(self, *args, **kwargs):
        passed.append(kwargs.get("num_sms"))
        return original_run(self, *args, **kwargs)

    monkeypatch.setattr(c_abi._LaunchPlan, "run", recording_run)
    x, h = make_inputs("many_tiny", torch.float32)
    torch.set_num_threads(1)
    one = fused_concat(x, h, 1.25, 0.5, backend="cpu")
    torch.set_num_threads(2)
    two = fused_concat(x, h, 1.25, 0.5, backend="cpu")
    assert passed == [1, 2]
    assert torch.equal(one, two)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="CPU kernel library not built")
def test_a_bound_launch_is_per_device():
    """c_abi's plans are cached per device too: a plan bound for one device, reused for another of the same
    spec and strides, would check the factors against the first device (the meta device stands in for a
    second GPU here; nothing is launched)."""
    from freeu_kernels.backends import c_abi, cpu_backend
    from freeu_kernels.spec import make_spec

    x, h = make_inputs("square8", torch.float32)
    lib = cpu_backend._LIBRARY.for_call(x, "cpu", "CPU", "cpu")
    on_cpu = c_abi.bind_launch(lib, x, h, make_spec(x, h), num_sms=80, kernel="CUDA")
    xm, hm = x.to("meta"), h.to("meta")
    on_meta = c_abi.bind_launch(lib, xm, hm, make_spec(xm, hm), num_sms=80, kernel="CUDA")
    assert on_meta is not on_cpu and on_meta.device == xm.device
    assert on_meta._factor("b", torch.tensor(1.0, device="meta"))[0] is not None  # accepted by pointer


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_autocast_does_not_reach_the_kernels(backend):
    """Under an autocast region the op gives what it gives outside it, bit for bit, in x's dtype (the torch
    backend's GEMMs would otherwise be recast, and their out= buffers rejected)."""
    x, h = make_inputs("separable_24x40", torch.float32)
    plain = fused_concat(x, h, 1.25, 0.5, backend=backend, threshold=2)
    device_type = x.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16):
        first = fused_concat(x, h, 1.25, 0.5, backend=backend, threshold=2)
        again = fused_concat(x, h, 1.25, 0.5, backend=backend, threshold=2)
        through_op = torch.ops.freeu.fused_concat(x, h, torch.tensor(1.25), torch.tensor(0.5), threshold=2,
                                                  backend=backend)
    assert first.dtype == torch.float32
    assert torch.equal(first, plain) and torch.equal(again, plain) and torch.equal(through_op, plain)


def test_environment_backend_is_read_per_call(monkeypatch):
    """$FREEU_KERNELS_BACKEND is part of the fast path's key for backend=None/"auto"."""
    x, h = make_inputs("square8", torch.float64)  # float64: only the torch backend computes it
    monkeypatch.setenv(freeu_ops.ENV_BACKEND, "torch")
    fused_concat(x, h, 1.25, 0.5)
    fused_concat(x, h, 1.25, 0.5)
    monkeypatch.setenv(freeu_ops.ENV_BACKEND, "no-such-backend")
    with pytest.raises(ValueError, match="backend"):
        fused_concat(x, h, 1.25, 0.5)
