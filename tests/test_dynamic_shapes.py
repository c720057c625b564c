"""Symbolic shapes: torch.compile(dynamic=True) and automatic dynamic, make_fx(tracing_mode="symbolic") and
torch.export with dynamic batch / height / width trace the op once, without specialising on N, H or W, and
give the eager results on every shape."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch.fx.experimental.proxy_tensor import make_fx

import freeu_kernels
from freeu_kernels import fused_concat, fused_concat_reference

# (N, C, H, W) of x; h has 3 channels. N starts at 2: Dynamo specialises sizes 0 and 1 by design.
SHAPES = [(2, 4, 8, 16), (3, 4, 12, 16), (2, 4, 10, 20), (4, 4, 6, 18)]

OPTIONS = {
    "default": {},
    "pair-windows-v2": dict(threshold=(2, 3), version=2, backbone_channels=[(2, 4), (0, 1)]),
    "radial-past-plane": dict(threshold=10 ** 30, mask="radial", high_gain=0.5),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    n, _, height, width = shape
    return torch.randn(shape, generator=generator), torch.randn(n, 3, height, width, generator=generator)


def _check(out, x, h, b, s, options):
    """Equal to the eager op (same kernels) and close to the reference."""
    torch.testing.assert_close(out, fused_concat(x, h, b, s, **options), rtol=0, atol=0)
    reference_options = {key: value for key, value in options.items() if key != "backend"}
    torch.testing.assert_close(out, fused_concat_reference(x, h, b, s, **reference_options))


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("backend", ["torch", None])
def test_compile_dynamic_traces_once(backend, options):
    options = dict(options, backend=backend)
    counter = CompileCounter()
    compiled = torch.compile(lambda x, h, b, s: fused_concat(x, h, b, s, **options), fullgraph=True, dynamic=True,
                             backend=counter)
    b, s = torch.tensor(1.3), torch.tensor(0.6)
    for shape in SHAPES:
        x, h = _inputs(shape)
        _check(compiled(x, h, b, s), x, h, b, s, options)
    assert counter.frame_count == 1


def test_raw_op_compile_dynamic_traces_once():
    counter = CompileCounter()
    compiled = torch.compile(lambda x, h, b, s: torch.ops.freeu.fused_concat(x, h, b, s, threshold=2),
                             fullgraph=True, dynamic=True, backend=counter)
    b, s = torch.tensor(1.3), torch.tensor(0.6)
    for shape in SHAPES:
        x, h = _inputs(shape)
        _check(compiled(x, h, b, s), x, h, b, s, dict(threshold=2))
    assert counter.frame_count == 1


def test_automatic_dynamic_stays_under_the_recompile_limit():
    """A new (N, H, W) per call: one static compile, then one dynamic one for every later shape (the
    ninth distinct shape used to raise FailOnRecompileLimitHit under fullgraph)."""
    counter = CompileCounter()
    compiled = torch.compile(lambda x, h, b, s: fused_concat(x, h, b, s), fullgraph=True, backend=counter)
    b, s = torch.tensor(1.3), torch.tensor(0.6)
    for step in range(10):
        x, h = _inputs((2 + step % 3, 4, 8 + 2 * step, 16 + step), seed=step)
        _check(compiled(x, h, b, s), x, h, b, s, {})
    assert counter.frame_count == 2


def test_compile_dynamic_with_inductor_and_channels_last():
    """Inductor around the op on symbolic sizes, and the fake's strides follow x's memory format."""
    compiled = torch.compile(lambda x, h, b, s: torch.nn.functional.silu(fused_concat(x, h, b, s, version=2)),
                             fullgraph=True, dynamic=True)
    b, s = torch.tensor(1.3), torch.tensor(0.6)
    for shape in SHAPES[:2]:
        x, h = (t.to(memory_format=torch.channels_last) for t in _inputs(shape))
        out = compiled(x, h, b, s)
        eager = torch.nn.functional.silu(fused_concat(x, h, b, s, version=2))
        torch.testing.assert_close(out, eager)
        assert out.stride() == eager.stride()


@pytest.mark.parametrize("raw_op", [False, True])
def test_make_fx_symbolic(raw_op):
    if raw_op:
        def call(x, h):
            return torch.ops.freeu.fused_concat(x, h, torch.tensor(1.3), torch.tensor(0.6), threshold=2,
                                                backbone_channels=[0, 2])
    else:
        def call(x, h):
            return fused_concat(x, h, 1.3, 0.6, threshold=2, backbone_channels=(0, 2))
    traced = make_fx(call, tracing_mode="symbolic")(*_inputs(SHAPES[0]))
    for shape in SHAPES:
        x, h = _inputs(shape)
        _check(traced(x, h), x, h, 1.3, 0.6, dict(threshold=2, backbone_channels=(0, 2)))


@pytest.mark.parametrize("strict", [False, True])
def test_export_with_dynamic_batch_height_width(strict):
    class Block(torch.nn.Module):
        def forward(self, x, h, b, s):
            return fused_concat(x, h, b, s, threshold=(1, 2), backbone_channels=(0, 2))

    batch, height, width = torch.export.Dim("batch"), torch.export.Dim("height"), torch.export.Dim("width")
    dims = {0: batch, 2: height, 3: width}
    b, s = torch.tensor(1.3), torch.tensor(0.6)
    program = torch.export.export(Block(), (*_inputs(SHAPES[0]), b, s), dynamic_shapes=(dims, dims, None, None),
                                  strict=strict)
    module = program.module()
    for shape in SHAPES:
        x, h = _inputs(shape)
        _check(module(x, h, b, s), x, h, b, s, dict(threshold=(1, 2), backbone_channels=(0, 2)))


@pytest.mark.parametrize("bad, error, match", [
    (dict(backbone_channels=(0, 9)), ValueError, "backbone_channels must satisfy"),
    (dict(mask="disc"), ValueError, "mask must be one of"),
    (dict(threshold=(1, 2), mask="radial"), ValueError, "threshold: the radial mask takes one radius"),
    (dict(high_gain=float("nan")), ValueError, "high_gain must be a finite number"),
])
def test_symbolic_tracing_still_rejects_bad_options(bad, error, match):
    """The size-free checks keep the eager messages (make_fx symbolic, and the fake behind it)."""
    with pytest.raises(error, match=match):
        make_fx(lambda x, h: fused_concat(x, h, 1.3, 0.6, **bad), tracing_mode="symbolic")(*_inputs(SHAPES[0]))
    raw = dict(bad)  # the schema's forms of the same options
    if "threshold" in raw:
        raw["threshold"], raw["threshold_cols"] = raw["threshold"]
    if "backbone_channels" in raw:
        raw["backbone_channels"] = list(raw["backbone_channels"])
    with pytest.raises(error, match=match):
        make_fx(lambda x, h: torch.ops.freeu.fused_concat(x, h, torch.tensor(1.3), torch.tensor(0.6), **raw),
                tracing_mode="symbolic")(*_inputs(SHAPES[0]))


def test_symbolic_tracing_rejects_mismatched_planes():
    x, _ = _inputs(SHAPES[0])
    _, h = _inputs(SHAPES[1])
    with pytest.raises(ValueError, match="h must have the same"):
        make_fx(lambda a, c: fused_concat(a, c, 1.3, 0.6), tracing_mode="symbolic")(x, h)


def test_threshold_cap_selects_what_the_unbounded_threshold_does():
    """The traced path caps thresholds at SIZE_FREE_THRESHOLD_CAP to fit the schema's int64; on a real plane
    that selects what any larger threshold does, for both masks."""
    x, h = _inputs(SHAPES[0])
    cap = freeu_kernels.spec.SIZE_FREE_THRESHOLD_CAP
    for mask in ("box", "radial"):
        capped = torch.ops.freeu.fused_concat(x, h, torch.tensor(1.3), torch.tensor(0.6), threshold=cap, mask=mask)
        torch.testing.assert_close(capped, fused_concat_reference(x, h, 1.3, 0.6, threshold=10 ** 40, mask=mask))
