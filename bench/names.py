"""Provider and section names shared by the harness's modules.

They live here, in a module that imports nothing from bench/, so that results.py (which derives ratios
against torch.cat, copy, diffusers and the no-FreeU step) and the modules that produce rows
(providers.py, unet_bench.py, overhead.py, crossover.py) can all use them without importing each other.
"""

from typing import Optional

__all__ = [
    "DIFFUSERS", "DIFFUSERS_COMPILED", "TORCH_CAT", "COPY", "REFERENCE", "FUSED_PREFIX", "TRIVIAL_OP",
    "NO_FREEU", "DIFFUSERS_FREEU", "FUSED_FREEU", "FFT", "BASELINES", "NOT_SUPPORTED",
    "VIA_DISPATCHER", "FLOAT_FACTORS", "fused_provider_name", "is_fused", "fused_backend",
]

# Op level (bench/providers.py).
DIFFUSERS = "diffusers"
DIFFUSERS_COMPILED = "diffusers+compile"
TORCH_CAT = "torch.cat"
COPY = "copy"
REFERENCE = "reference"
FUSED_PREFIX = "freeu_kernels"
# Per-call overhead (bench/overhead.py): a torch.library.custom_op that only concatenates.
TRIVIAL_OP = "trivial custom_op"
# Per-call overhead: a backend reached another way than fused_concat with 0-d tensor factors (the
# suffix of its provider name, see fused_provider_name): torch.ops.freeu.fused_concat called directly
# (the dispatcher, what a traced graph runs), and fused_concat with Python-float factors.
VIA_DISPATCHER = "via torch.ops"
FLOAT_FACTORS = "with float factors"
# U-Net level (bench/unet_bench.py).
NO_FREEU = "none"
DIFFUSERS_FREEU = "diffusers"
FUSED_FREEU = "freeu_kernels"
# Crossover (bench/crossover.py): the torch backend forced onto its FFT path.
FFT = "fft"

# What the freeu_kernels backends are compared with; the plots and tables keep them apart from the backends.
BASELINES = (DIFFUSERS, DIFFUSERS_COMPILED, REFERENCE, TORCH_CAT, COPY, TRIVIAL_OP)

# The note of a row a backend cannot compute by design (a known limit, not a failure).
NOT_SUPPORTED = "not supported by this backend"


def fused_provider_name(backend: str, path: Optional[str] = None) -> str:
    """'freeu_kernels[triton]' for backend 'triton'; with a ``path`` (VIA_DISPATCHER, FLOAT_FACTORS),
    'freeu_kernels[triton] via torch.ops'."""
    name = f"{FUSED_PREFIX}[{backend}]"
    return name if path is None else f"{name} {path}"


def is_fused(name: str) -> bool:
    """Whether a provider name is one of the freeu_kernels backends (reached any way)."""
    return name.startswith(FUSED_PREFIX + "[")


def fused_backend(name: str) -> Optional[str]:
    """The backend a provider name runs: 'cpu' for 'freeu_kernels[cpu]' and 'freeu_kernels[cpu] via
    torch.ops'; None for a name that is no freeu_kernels backend."""
    if not is_fused(name):
        return None
    return name[len(FUSED_PREFIX) + 1:].split("]", 1)[0]
