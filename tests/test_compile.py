"""torch.compile: fullgraph tracing, no recompiles when b and s change, and CUDA graphs on a GPU."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

from conftest import BACKENDS, DEVICE, make_inputs
from freeu_kernels import fused_concat


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("use_compile", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_changing_factors_never_recompiles(backend, use_compile):
    x, h = make_inputs("odd7x5", torch.float32)
    counter = CompileCounterWithBackend("eager")

    def step(x, h, b, s):
        return fused_concat(x, h, b, s, threshold=1, backend=backend) * 2

    run = torch.compile(step, backend=counter, fullgraph=True) if use_compile else step
    for b_value, s_value in [(1.1, 0.9), (1.4, 0.2), (1.0, 1.0), (1.6, 0.0)]:
        b = torch.tensor(b_value, device=DEVICE)
        s = torch.tensor(s_value, device=DEVICE)
        torch.testing.assert_close(run(x, h, b, s), step(x, h, b, s))
    assert counter.frame_count == (1 if use_compile else 0)


def test_fullgraph_with_inductor_matches_eager():
    """The op is one opaque node with a correct fake: Inductor compiles around it without a graph break."""
    x, h = make_inputs("5d", torch.float32)
    counter = CompileCounter()

    def block(x, h, b, s):
        return torch.nn.functional.silu(fused_concat(x, h, b, s, version=2))

    eager = block(x, h, torch.tensor(1.3), torch.tensor(0.4))
    torch.compile(block, backend=counter, fullgraph=True)(x, h, torch.tensor(1.3), torch.tensor(0.4))
    assert counter.frame_count == 1
    compiled = torch.compile(block, fullgraph=True)(x, h, torch.tensor(1.3), torch.tensor(0.4))
    torch.testing.assert_close(compiled, eager)


def test_compiled_backward():
    x, h = make_inputs("odd7x5", torch.float32)
    x.requires_grad_(True)
    h.requires_grad_(True)
    compiled = torch.compile(lambda a, c: fused_concat(a, c, 1.3, 0.4).square().sum(), backend="aot_eager",
                             fullgraph=True)
    gx, gh = torch.autograd.grad(compiled(x, h), (x, h))
    ex, eh = torch.autograd.grad(fused_concat(x, h, 1.3, 0.4).square().sum(), (x, h))
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gh, eh)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"] or ["triton"])
def test_cuda_graph_replay_reads_new_factors(backend):
    """Factors on the device are read at replay time: a captured graph follows a changing schedule."""
    x, h = make_inputs("square8", torch.float16)
    b = torch.tensor(1.2, device="cuda")
    s = torch.tensor(0.5, device="cuda")
    for _ in range(2):  # warm up (compiles the kernel, fills the caches) outside the capture
        fused_concat(x, h, b, s, backend=backend)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_concat(x, h, b, s, backend=backend)
    for b_value, s_value in [(1.5, 0.1), (1.0, 1.0)]:
        b.fill_(b_value)
        s.fill_(s_value)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, fused_concat(x, h, b_value, s_value, backend="torch"), rtol=2e-3, atol=2e-3)
