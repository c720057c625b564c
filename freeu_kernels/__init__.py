"""freeu_kernels: FreeU's backbone scaling, Fourier skip filter and concat as one fused operator.

``fused_concat`` is the op (``torch.ops.freeu.fused_concat`` behind it); ``fused_concat_reference`` and
``fourier_filter_reference`` replicate the official FFT code path (the test oracle and the baseline).
The framework integrations live in :mod:`freeu_kernels.integrations`; their main names are re-exported
here and imported on first use (diffusers is an optional extra).
"""

from .ops import available_backends, fused_concat, resolve_backend
from .reference import fourier_filter_reference, fused_concat_reference, structure_map
from .spec import Backend, Mask

__version__ = "0.1.0"

# Name -> the integrations module that defines it, imported on first use of the name.
_LAZY_NAMES = {
    "enable_freeu": "diffusers",
    "disable_freeu": "diffusers",
    "freeu": "diffusers",
    "FreeUSchedule": "stages",
    "FreeUStage": "stages",
    "ChannelWindow": "stages",
    "PRESETS": "presets",
    "get_preset": "presets",
}


def __getattr__(name):
    module_name = _LAZY_NAMES.get(name)
    if module_name is None:
        raise AttributeError(f"module 'freeu_kernels' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".integrations.{module_name}", __name__), name)


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
    *sorted(_LAZY_NAMES),
]
