"""freeu_kernels: FreeU's backbone scaling, Fourier skip filter and concat as one fused operator.

``fused_concat`` is the op (``torch.ops.freeu.fused_concat`` behind it); ``fused_concat_reference`` and
``fourier_filter_reference`` replicate the official FFT code path (the test oracle and the baseline).
"""

from .ops import available_backends, fused_concat, resolve_backend
from .reference import fourier_filter_reference, fused_concat_reference, structure_map
from .spec import Backend, Mask

__version__ = "0.1.0"

# diffusers is an optional extra: its integration is imported on first use of one of these names.
_DIFFUSERS_NAMES = {"enable_freeu", "disable_freeu", "freeu", "FreeUSchedule"}
_PRESET_NAMES = {"PRESETS", "get_preset"}


def __getattr__(name):
    if name in _DIFFUSERS_NAMES:
        from . import diffusers_integration

        return getattr(diffusers_integration, name)
    if name in _PRESET_NAMES:
        from . import presets

        return getattr(presets, name)
    raise AttributeError(f"module 'freeu_kernels' has no attribute {name!r}")


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
    *sorted(_DIFFUSERS_NAMES),
    *sorted(_PRESET_NAMES),
]
