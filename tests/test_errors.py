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
    ],
)
def test_bad_input_names_the_argument(kwargs, error, match):
    args = dict(x=X, h=H, b=1.2, s=0.5)
    args.update(kwargs)
    x, h, b, s = args.pop("x"), args.pop("h"), args.pop("b"), args.pop("s")
    with pytest.raises(error, match=match):
        fused_concat(x, h, b, s, **args)


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
