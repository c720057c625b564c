"""Per-call host work, counted (never timed): a repeated call re-validates nothing and runs a bounded number
of aten ops. The wall-time comparison with a trivial custom op is tools/call_overhead.py (bench)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import freeu_kernels
from freeu_kernels import ops as freeu_ops
from freeu_kernels import spec as spec_module
from freeu_kernels.backends import c_abi

X = torch.randn(1, 4, 8, 8)
H = torch.randn(1, 4, 8, 8)
BACKENDS = [b for b in freeu_kernels.available_backends("cpu") if b in ("torch", "cpu")]


class _CountAtenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.freeu.fused_concat.default:
            # The op reaches the mode whole; count what its kernel runs by calling it under the mode.
            with self:
                return freeu_ops._fused_concat_impl(*args, **(kwargs or {}))
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_call_does_not_revalidate(backend, monkeypatch):
    """The second identical call reaches neither make_spec nor the C argument packing (cpu backend)."""
    calls = {"make_spec": 0, "plan": 0}
    original_make_spec, original_plan = spec_module.make_spec, c_abi._LaunchPlan

    def counting_make_spec(*args, **kwargs):
        calls["make_spec"] += 1
        return original_make_spec(*args, **kwargs)

    class CountingPlan(original_plan):
        __slots__ = ()

        def __init__(self, *args, **kwargs):
            calls["plan"] += 1
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(spec_module, "make_spec", counting_make_spec)
    monkeypatch.setattr(c_abi, "_LaunchPlan", CountingPlan)
    monkeypatch.setattr(spec_module, "_SPEC_CACHE", {})
    monkeypatch.setattr(c_abi, "_PLANS", {})
    # The op's own plans too: a call an earlier test made would otherwise skip the first validation here.
    monkeypatch.setattr(freeu_ops, "_EAGER_CALLS", {})
    monkeypatch.setattr(freeu_ops, "_CALL_PLANS", {})
    x, h = X.clone(), H.clone()  # fresh tensors: the caches key on properties, not on identity
    first = freeu_kernels.fused_concat(x, h, 1.2, 0.9, backend=backend, threshold=(1, 2))
    after_first = dict(calls)
    assert after_first["make_spec"] == 1  # the wrapper and the op share one memoised spec
    for _ in range(3):
        again = freeu_kernels.fused_concat(X.clone(), H.clone(), 1.2, 0.9, backend=backend, threshold=(1, 2))
    assert calls == after_first
    assert torch.equal(first, again)
    # A different shape, dtype or option is a new key: validated once more.
    freeu_kernels.fused_concat(x[:, :3], h, 1.2, 0.9, backend=backend, threshold=(1, 2))
    assert calls["make_spec"] == after_first["make_spec"] + 1


def _ops_per_call(backend):
    freeu_kernels.fused_concat(X, H, 1.2, 0.9, backend=backend)  # warm the caches
    with _CountAtenOps() as counter:
        freeu_kernels.fused_concat(X, H, 1.2, 0.9, backend=backend)
    return counter.ops


@pytest.mark.skipif("cpu" not in BACKENDS, reason="CPU kernel library not built")
def test_cpu_backend_call_is_one_allocation():
    """On the cpu backend a version-1 call with Python-number factors runs the output's allocation and
    nothing else (memoised factor tensors, read by the kernel through their pointers: no .item()); the
    kernel is one ctypes call."""
    ops = _ops_per_call("cpu")
    assert ops == ["aten.new_empty.default"], ops


def test_torch_backend_ops_per_call_are_bounded():
    """The torch backend on a tiny plane: a bounded count of aten ops (views and host reads included), the
    same every call: 8 (the output, two factor reads, two output slices, the backbone multiply, a view of
    h and one GEMM); 23 before the dense small-plane path."""
    first, second = _ops_per_call("torch"), _ops_per_call("torch")
    assert first == second
    assert len(first) <= 9, first


def test_first_call_does_not_import_dynamo():
    """torch.library.custom_op wraps kernels in torch._dynamo.disable, whose import made the first call
    cost ~1.5 s; the op is registered without it (ops.py). Counted: the module is not imported."""
    import subprocess
    import sys

    code = ("import sys, torch, freeu_kernels\n"
            "x = torch.randn(1, 4, 16, 16, requires_grad=True)\n"
            "for backend in freeu_kernels.available_backends('cpu'):\n"
            "    if backend in ('torch', 'cpu'):\n"
            "        freeu_kernels.fused_concat(x, x, 1.2, 0.9, backend=backend, version=2).sum().backward()\n"
            "print('torch._dynamo' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False", result.stdout + result.stderr
