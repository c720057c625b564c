"""The providers: every way of producing (or bounding) one FreeU concat that the benchmark times.

Each provider turns a case's inputs into a zero-argument call. The calls are what is timed; nothing
inside them allocates inputs, copies to the device or converts layouts (that happens in ``prepare``).

=====================  ===================================================================================
provider               what one call does
=====================  ===================================================================================
diffusers              ``apply_freeu(0, x, h, b1=b, s1=s, ...)`` then ``torch.cat([x, h], 1)``: diffusers'
                       code path today (complex FFT in float32, a full-size float32 mask, inverse FFT,
                       cast, concat). apply_freeu scales x in place; like a U-Net, the call works on a
                       scratch copy of x made once and the clone is *not* timed (the scratch drifts by b
                       per call, which does not change the time). 5-D cases run on the 4-D (N*F, C, H, W)
                       layout diffusers' video U-Nets use (diffusers' filter is 4-D only).
diffusers+compile      the same function under ``torch.compile`` (default mode, automatic dynamic shapes).
                       x is a graph input here, so inductor also writes the scaled half back into it
                       (|x|/2 more bytes than inside a compiled U-Net, where x is an intermediate).
torch.cat              ``torch.cat([x, h], 1)``: the same bytes as FreeU, no math. The floor to reach.
copy                   ``out.copy_(src)`` with src as large as the output: 2 |out| = the same bytes as the
                       case. The device's bandwidth ceiling, measured in the same run.
reference              ``freeu_kernels.fused_concat_reference``: the official FreeU code path (FFT, shift,
                       mask, inverse FFT, cat) on the model's dtype, never writing its inputs.
freeu_kernels[NAME]    ``freeu_kernels.fused_concat(x, h, b, s, backend=NAME)`` with b, s 0-d tensors on the
                       device, for every backend ``available_backends(device)`` lists.
=====================  ===================================================================================
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

import freeu_kernels
from freeu_kernels.backends import registry
from freeu_kernels.spec import make_spec, output_memory_format

from .cases import Case
from .names import (COPY, DIFFUSERS, DIFFUSERS_COMPILED, FUSED_PREFIX, REFERENCE, TORCH_CAT, fused_provider_name,
                    is_fused)

__all__ = [
    "CaseInputs",
    "Prepared",
    "Provider",
    "make_inputs",
    "all_providers",
    "default_provider_names",
    "select_providers",
    "DIFFUSERS",
    "TORCH_CAT",
    "COPY",
    "REFERENCE",
    "OP_B",
    "OP_S",
    "fused_provider_name",
    "is_fused",
    "default_backend",
]

# Stage-1 SDXL factors from the FreeU README; the time does not depend on them.
OP_B = 1.3
OP_S = 0.9


@dataclass
class CaseInputs:
    """The tensors of one case on the device: x, h, and b, s both as Python floats and as 0-d tensors."""

    case: Case
    x: torch.Tensor
    h: torch.Tensor
    b_tensor: torch.Tensor
    s_tensor: torch.Tensor
    b: float = OP_B
    s: float = OP_S


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> CaseInputs:
    """Standard-normal x and h for ``case``, drawn on ``device`` itself (a GB-sized CPU draw would dominate
    the setup of the largest cases) from a fixed seed."""
    generator = torch.Generator(device).manual_seed(seed)
    x = torch.randn(case.x_shape, generator=generator, device=device).to(case.dtype)
    h = torch.randn(case.h_shape, generator=generator, device=device).to(case.dtype)
    return CaseInputs(
        case=case,
        x=x,
        h=h,
        b_tensor=torch.tensor(OP_B, dtype=torch.float32, device=device),
        s_tensor=torch.tensor(OP_S, dtype=torch.float32, device=device),
    )


def default_backend(inputs: CaseInputs) -> Optional[str]:
    """The backend ``fused_concat`` runs for this case when the caller names none: the automatic choice
    (or $FREEU_KERNELS_BACKEND), as ``freeu_kernels.resolve_backend`` decides it for the case's spec and
    layout on this machine. None when the op would reject the case."""
    case, x = inputs.case, inputs.x
    try:
        spec = make_spec(x, inputs.h, threshold=case.threshold, mask=case.mask)
        chosen = freeu_kernels.resolve_backend(None, x.device, spec,
                                               channels_last=output_memory_format(x) != torch.contiguous_format)
    except (TypeError, ValueError):
        return None
    return chosen.value


@dataclass
class Prepared:
    """A provider ready to run one case: ``call`` is what is timed; ``to_case_layout`` maps its output back
    to the case's (N, Cx + Ch, ...) layout for the correctness check."""

    call: Callable[[], torch.Tensor]
    to_case_layout: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda out: out)


@dataclass(frozen=True)
class Provider:
    """A named way to compute one case. ``computes_freeu`` says whether its output is checked against the
    reference (torch.cat and copy compute something else by design)."""

    name: str
    description: str
    prepare: Callable[[CaseInputs], Prepared]
    computes_freeu: bool = True
    compiled: bool = False
    # None when the provider can run on this device and case, else why not (case None: on any case).
    unavailable: Callable[[Optional[Case], torch.device], Optional[str]] = lambda case, device: None


def _frames_into_batch(t: torch.Tensor) -> torch.Tensor:
    """(N, C, F, H, W) -> (N*F, C, H, W): the layout diffusers' video U-Nets hand to their up blocks."""
    n, c, f, height, width = t.shape
    return t.transpose(1, 2).reshape(n * f, c, height, width).contiguous()


def _batch_into_frames(t: torch.Tensor, frames: int) -> torch.Tensor:
    nf, c, height, width = t.shape
    return t.reshape(nf // frames, frames, c, height, width).transpose(1, 2)


def _diffusers_freeu_concat(x: torch.Tensor, h: torch.Tensor, b: float, s: float) -> torch.Tensor:
    """diffusers' stage-1 FreeU followed by the up block's concat (x is scaled in place, as in diffusers)."""
    from diffusers.utils.torch_utils import apply_freeu

    x, h = apply_freeu(0, x, h, b1=b, s1=s, b2=b, s2=s)
    return torch.cat([x, h], dim=1)


_COMPILED_DIFFUSERS = None


def _compiled_diffusers_freeu_concat():
    """One torch.compile wrapper for all cases: dynamo recompiles per new shape/dtype (then generalises to
    dynamic shapes), and the limit is raised so no case silently falls back to eager."""
    global _COMPILED_DIFFUSERS
    if _COMPILED_DIFFUSERS is None:
        import torch._dynamo

        for limit_name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, limit_name):
                setattr(torch._dynamo.config, limit_name, max(getattr(torch._dynamo.config, limit_name), 512))
        _COMPILED_DIFFUSERS = torch.compile(_diffusers_freeu_concat)
    return _COMPILED_DIFFUSERS


def _prepare_diffusers(compiled: bool) -> Callable[[CaseInputs], Prepared]:
    def prepare(inputs: CaseInputs) -> Prepared:
        video = inputs.x.dim() == 5
        scratch = _frames_into_batch(inputs.x) if video else inputs.x.clone()
        skip = _frames_into_batch(inputs.h) if video else inputs.h
        function = _compiled_diffusers_freeu_concat() if compiled else _diffusers_freeu_concat
        frames = inputs.x.shape[2] if video else 0
        return Prepared(
            call=lambda: function(scratch, skip, inputs.b, inputs.s),
            to_case_layout=(lambda out: _batch_into_frames(out, frames)) if video else (lambda out: out),
        )

    return prepare


def _diffusers_unavailable(case: Optional[Case], device: torch.device) -> Optional[str]:
    if importlib.util.find_spec("diffusers") is None:
        return "diffusers is not installed"
    if case is not None and (case.threshold != 1 or case.mask != "box"):
        return "diffusers' filter is fixed to the box mask with threshold 1"
    return None


def _prepare_cat(inputs: CaseInputs) -> Prepared:
    x, h = inputs.x, inputs.h
    return Prepared(call=lambda: torch.cat([x, h], dim=1))


def _prepare_copy(inputs: CaseInputs) -> Prepared:
    # src holds real data: an untouched CPU allocation would map every page to the one shared zero page
    # and read from cache.
    source = torch.cat([inputs.x, inputs.h], dim=1)
    destination = torch.empty_like(source)
    return Prepared(call=lambda: destination.copy_(source))


def _prepare_reference(inputs: CaseInputs) -> Prepared:
    x, h, case = inputs.x, inputs.h, inputs.case
    return Prepared(call=lambda: freeu_kernels.fused_concat_reference(
        x, h, inputs.b, inputs.s, case.threshold, mask=case.mask))


def _prepare_fused(backend: str) -> Callable[[CaseInputs], Prepared]:
    def prepare(inputs: CaseInputs) -> Prepared:
        x, h, b, s, case = inputs.x, inputs.h, inputs.b_tensor, inputs.s_tensor, inputs.case
        return Prepared(call=lambda: freeu_kernels.fused_concat(
            x, h, b, s, threshold=case.threshold, mask=case.mask, backend=backend))

    return prepare


def _fused_unavailable(backend: str) -> Callable[[Optional[Case], torch.device], Optional[str]]:
    def unavailable(case: Optional[Case], device: torch.device) -> Optional[str]:
        if backend not in freeu_kernels.available_backends(device):
            return f"backend {backend!r} is not available on {device.type}"
        if backend == "triton" and device.type == "cpu":
            return "Triton's CPU interpreter (TRITON_INTERPRET=1) is a test tool, not timed"
        return None

    return unavailable


def all_providers(device: torch.device) -> List[Provider]:
    """Every provider, the freeu_kernels ones for each backend the package knows (available or not)."""
    providers = [
        Provider(DIFFUSERS, "diffusers' apply_freeu + torch.cat, eager", _prepare_diffusers(False),
                 unavailable=_diffusers_unavailable),
        Provider(DIFFUSERS_COMPILED, "diffusers' apply_freeu + torch.cat under torch.compile",
                 _prepare_diffusers(True), compiled=True, unavailable=_diffusers_unavailable),
        Provider(TORCH_CAT, "torch.cat([x, h], 1) alone: the same bytes, no FreeU (the floor)", _prepare_cat,
                 computes_freeu=False),
        Provider(COPY, "out.copy_(src) of the output's bytes: the bandwidth ceiling", _prepare_copy,
                 computes_freeu=False),
        Provider(REFERENCE, "freeu_kernels.fused_concat_reference: the official FFT path", _prepare_reference),
    ]
    for backend in registry.PREFERENCE_ORDER:
        providers.append(Provider(fused_provider_name(backend), f"freeu_kernels.fused_concat(backend={backend!r})",
                                  _prepare_fused(backend), unavailable=_fused_unavailable(backend)))
    return providers


def default_provider_names(device: torch.device, quick: bool = False) -> List[str]:
    """Everything that can run here, except torch.compile providers off CUDA (compiling is slow on a CPU)
    and in ``quick`` runs (a compile per shape and dtype costs more than the whole quick budget)."""
    compile_ok = device.type == "cuda" and not quick
    return [p.name for p in all_providers(device)
            if (compile_ok or not p.compiled) and (not is_fused(p.name) or p.unavailable(None, device) is None)]


def select_providers(device: torch.device, patterns: Optional[Sequence[str]] = None,
                     quick: bool = False) -> List[Provider]:
    """The providers named by ``patterns`` (exact names, globs, or 'freeu_kernels' for all its backends),
    else the defaults for the device and ``quick``. Unknown names raise ValueError."""
    providers = all_providers(device)
    if not patterns:
        wanted = set(default_provider_names(device, quick))
        return [p for p in providers if p.name in wanted]
    chosen = set()
    for pattern in patterns:
        hits = [p.name for p in providers if _name_matches(p.name, pattern)]
        if not hits:
            raise ValueError(f"providers must be among {[p.name for p in providers]} (or 'freeu_kernels'), "
                             f"got {pattern!r}")
        chosen.update(hits)
    return [p for p in providers if p.name in chosen]


def _name_matches(name: str, pattern: str) -> bool:
    """Exact name, 'freeu_kernels' for every backend, or a glob in which only * and ? are special
    (provider names contain brackets, which fnmatch would read as a character class)."""
    if pattern == FUSED_PREFIX:
        return is_fused(name)
    regex = "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)
    return re.fullmatch(regex, name) is not None
