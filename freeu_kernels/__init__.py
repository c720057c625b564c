"""freeu_kernels: FreeU's backbone scaling, Fourier skip filter and concat as one fused operator.

``fused_concat`` is the op (``torch.ops.freeu.fused_concat`` behind it); ``fused_concat_reference`` and
``fourier_filter_reference`` replicate the official FFT code path (the test oracle and the baseline).
"""

from .ops import available_backends, fused_concat, resolve_backend
from .reference import fourier_filter_reference, fused_concat_reference, structure_map
from .spec import Backend, Mask

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "Mask",
    "available_backends",
    "fourier_filter_reference",
    "fused_concat",
    "fused_concat_reference",
    "resolve_backend",
    "structure_map",
    "__version__",
]
