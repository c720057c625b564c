"""Provider and section names shared by the harness's modules.

They live here, in a module that imports nothing from bench/, so that results.py (which derives ratios
against torch.cat, copy, diffusers and the no-FreeU step) and the modules that produce rows
(providers.py, unet_bench.py, overhead.py, crossover.py) can all use them without importing each other.
"""

__all__ = [
    "DIFFUSERS", "DIFFUSERS_COMPILED", "TORCH_CAT", "COPY", "REFERENCE", "FUSED_PREFIX", "TRIVIAL_OP",
    "NO_FREEU", "DIFFUSERS_FREEU", "FUSED_FREEU", "FFT", "BASELINES", "NOT_SUPPORTED",
    "fused_provider_name", "is_fused",
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


def fused_provider_name(backend: str) -> str:
    """'freeu_kernels[triton]' for backend 'triton'."""
    return f"{FUSED_PREFIX}[{backend}]"


def is_fused(name: str) -> bool:
    """Whether a provider name is one of the freeu_kernels backends."""
    return name.startswith(FUSED_PREFIX + "[")
