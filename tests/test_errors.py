"""Bad input raises ValueError/TypeError naming the argument: never a crash or a silently wrong output."""

from __future__ import annotations

import pytest
import torch

from freeu_kernels import fused_concat

X = torch.randn(2, 4, 6, 6)
H = torch.randn(2, 3, 6, 6)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(x=torch.randn(4, 6, 6)), ValueError, "x must be 4-D"),
        (dict(h=torch.randn(2, 3, 1, 6, 6)), ValueError, "same rank"),
        (dict(h=torch.randn(3, 3, 6, 6)), ValueError, "batch size"),
        (dict(h=torch.randn(2, 3, 6, 7)), ValueError, "trailing dims"),
        (dict(h=H.double()), TypeError, "same dtype"),
        (dict(h=H.to("meta")), ValueError, "same device"),
        (dict(x=X.int(), h=H.int()), TypeError, "x must have a floating dtype"),
        (dict(x=[1, 2]), TypeError, "x must be a torch.Tensor"),
        (dict(threshold=-1), ValueError, "threshold must be >= 0"),
        (dict(threshold=1.5), TypeError, "threshold must be an int"),
        (dict(threshold=True), TypeError, "threshold must be an int"),
        (dict(b=torch.ones(2)), ValueError, "b must be a Python float or a 0-d tensor"),
        (dict(s="0.5"), TypeError, "s must be a Python float"),
        (dict(version=3), ValueError, "version must be 1 or 2"),
        (dict(backbone_channels=(3, 1)), ValueError, "backbone_channels"),
        (dict(backbone_channels=(0, 9)), ValueError, "backbone_channels"),
        (dict(mask="gaussian"), ValueError, "mask must be one of"),
        (dict(backend="tpu"), ValueError, "backend must be one of"),
        (dict(high_gain="1"), TypeError, "high_gain"),
        # issue 13 item 6 and issue 14: each was a RuntimeError, a bare OverflowError or accepted
        (dict(version=2.0), ValueError, "version must be 1 or 2"),
        (dict(b=1e400), ValueError, "b must be a finite number"),
        (dict(s=10**400), ValueError, "s must be a finite number"),
        (dict(b=float("nan")), ValueError, "b must be a finite number"),
        (dict(s=float("-inf")), ValueError, "s must be a finite number"),
        (dict(high_gain=1e400), ValueError, "high_gain must be a finite number"),
        (dict(high_gain=float("nan")), ValueError, "high_gain must be a finite number"),
        (dict(backbone_channels=iter([0, 2])), TypeError, "backbone_channels must be a .start, stop. pair"),
        (dict(backbone_channels=[(0, 1), (2, 9)]), ValueError, r"backbone_channels\[1\]"),
        (dict(backbone_channels=[(0, 1), 2]), ValueError, r"backbone_channels\[1\]"),
        (dict(backbone_channels=(0, 1, 2)), ValueError, "backbone_channels"),
        (dict(threshold=(1, 2, 3)), ValueError, "threshold must be an int or a"),
        (dict(threshold=(1, -2)), ValueError, r"threshold\[1\] must be >= 0"),
        (dict(threshold=(1, 2), mask="radial"), ValueError, "threshold: the radial mask takes one radius"),
        (dict(x=X.to_sparse(), h=H.to_sparse()), TypeError, "x must be a dense"),
        (dict(h=H.to_sparse()), TypeError, "h must be a dense"),
        (dict(b=torch.tensor(1.0).to_sparse()), TypeError, "b must be a dense"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, match):
    args = dict(x=X, h=H, b=1.2, s=0.5)
    args.update(kwargs)
    x, h, b, s = args.pop("x"), args.pop("h"), args.pop("b"), args.pop("s")
    with pytest.raises(error, match=match):
        fused_concat(x, h, b, s, **args)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no mkldnn in this torch build")
def test_mkldnn_tensors_are_a_clear_error():
    with pytest.raises(TypeError, match="x must be a dense"):
        fused_concat(X.to_mkldnn(), H.to_mkldnn(), 1.2, 0.5)


def test_cache_never_lets_a_bad_call_through():
    """After a good call is memoised, the same shapes with a bad option of an equal value still raise."""
    fused_concat(X, H, 1.2, 0.5, version=2, threshold=1, high_gain=1.0)
    for kwargs, error in [(dict(version=2.0), ValueError), (dict(threshold=True), TypeError),
                          (dict(high_gain=float("inf")), ValueError), (dict(threshold=1.0), TypeError)]:
        args = dict(version=2, threshold=1, high_gain=1.0)
        args.update(kwargs)
        with pytest.raises(error):
            fused_concat(X, H, 1.2, 0.5, **args)
    with pytest.raises(TypeError, match="same dtype"):
        fused_concat(X, H.double(), 1.2, 0.5, version=2)
    with pytest.raises(ValueError, match="b must be a finite"):
        fused_concat(X, H, float("inf"), 0.5, version=2)


def test_huge_threshold_through_the_op_schema_is_clamped_by_the_wrapper():
    """2**63 does not fit the schema's int64; fused_concat clamps it to the plane first (same result)."""
    out = fused_concat(X, H, 1.2, 0.5, threshold=2**63, backend="torch")
    torch.testing.assert_close(out, fused_concat(X, H, 1.2, 0.5, threshold=9, backend="torch"))


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_raw_op_threshold_cols_below_minus_one_is_an_error(backend):
    """The schema's threshold_cols: >= 0 for a per-axis box, -1 for "as threshold"; -2 is not read as -1."""
    b, s = torch.tensor(1.2), torch.tensor(0.5)
    torch.ops.freeu.fused_concat(X, H, b, s, threshold=1, threshold_cols=-1, backend=backend)  # cached
    with pytest.raises(ValueError, match="threshold_cols"):
        torch.ops.freeu.fused_concat(X, H, b, s, threshold=1, threshold_cols=-2, backend=backend)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_unavailable_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="'cuda' is not available"):
        fused_concat(X, H, 1.2, 0.5, backend="cuda")


def test_kernel_backends_reject_float64():
    """float64 runs on the torch backend only; the kernels say so instead of computing in float32."""
    import freeu_kernels

    if "triton" not in freeu_kernels.available_backends(X.device):
        pytest.skip("triton backend not available")
    with pytest.raises(TypeError, match="backend='torch'"):
        fused_concat(X.double(), H.double(), 1.2, 0.5, backend="triton")
