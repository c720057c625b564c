"""U-Net level: what FreeU costs in one denoising step of a whole UNet2DConditionModel.

Three copies of one randomly initialised U-Net (same weights) are timed interleaved, one step each at
batch 2 (classifier-free guidance):

- ``none``: FreeU off;
- ``diffusers``: ``unet.enable_freeu(s1, s2, b1, b2)`` (diffusers' FFT path at up blocks 0 and 1);
- ``freeu_kernels``: ``freeu_kernels.enable_freeu(unet, b1=, b2=, s1=, s2=, placement="diffusers")``, the
  same concats fused (skipped, with a note, when the integration cannot be imported).

FreeU overhead = (step with FreeU - step without) / step without, per mode (eager, and compiled where
torch.compile is enabled). Peak memory of one eager step per variant (``peak_extra_bytes``,
bench/memory.py: above the weights and inputs, so the step's activations count): what FreeU's
temporaries add to a step's peak. On GPU the published configs run in float16; on CPU a reduced config
(bench/unet_configs.py: REDUCTION_NOTE) runs in float32 and every row says "reduced".
"""

from __future__ import annotations

import copy
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, TextIO, Tuple

import torch

from .cases import SHORT_DTYPE
from .names import DIFFUSERS_FREEU, FUSED_FREEU, NO_FREEU
from .op_bench import measure_each, profile_columns
from .results import result_row
from .timing import TimingBudget, format_seconds
from .unet_configs import MODELS, REDUCTION_NOTE, UNetModel, reduced_config, unet_inputs

__all__ = ["iter_unet_level", "NO_FREEU", "DIFFUSERS_FREEU", "FUSED_FREEU", "UNET_SIZES", "unet_case_name"]

UNET_SIZES = ("auto", "real", "reduced")


def unet_case_name(model: UNetModel, reduced: bool, batch: int) -> str:
    """'SDXL base 1024px b2' or 'SDXL base (reduced) b2'."""
    return f"{model.title} (reduced) b{batch}" if reduced else f"{model.title} {model.image_size}px b{batch}"


def _build_unet(config: Dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    # Creating the parameters directly on the device keeps SDXL's 2.6 B random parameters off the host.
    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    return unet.to(dtype=dtype).eval()


def _freeu_variants(base: torch.nn.Module, model: UNetModel) -> Tuple[Dict[str, torch.nn.Module], Dict[str, str]]:
    """The three U-Nets (FreeU off, diffusers' FreeU, freeu_kernels' FreeU) and notes for missing ones."""
    b1, b2, s1, s2 = model.freeu
    variants = {NO_FREEU: base}
    with_diffusers = copy.deepcopy(base)
    with_diffusers.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)
    variants[DIFFUSERS_FREEU] = with_diffusers
    notes = {}
    try:
        from freeu_kernels import enable_freeu
    except (ImportError, AttributeError) as error:
        notes[FUSED_FREEU] = f"skipped: freeu_kernels.enable_freeu is not importable ({type(error).__name__}: {error})"
        return variants, notes
    with_kernels = copy.deepcopy(base)
    try:
        # diffusers' placement (up blocks 0 and 1), so the two FreeU variants do the same work.
        returned = enable_freeu(with_kernels, b1=b1, b2=b2, s1=s1, s2=s2, placement="diffusers")
    except Exception as error:  # noqa: BLE001 - an integration in progress; reported, not fatal
        notes[FUSED_FREEU] = f"failed: freeu_kernels.enable_freeu raised {type(error).__name__}: {error}"[:240]
        return variants, notes
    variants[FUSED_FREEU] = returned if isinstance(returned, torch.nn.Module) else with_kernels
    return variants, notes


def _step(unet: Callable, inputs: Dict) -> Callable[[], torch.Tensor]:
    def call() -> torch.Tensor:
        with torch.inference_mode():
            return unet(**inputs, return_dict=False)[0]

    return call


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _output_checks(outputs: Dict[str, torch.Tensor]) -> Dict[str, str]:
    """FreeU must change the output (it is on); freeu_kernels is compared with diffusers' FreeU. Placement
    may differ (diffusers: up blocks 0 and 1; the official code: by channel count), so this is a note."""
    checks = {}
    base = outputs.get(NO_FREEU)
    for name, out in outputs.items():
        if name == NO_FREEU or base is None:
            continue
        parts = [f"rel. change vs no FreeU {_relative_difference(out, base):.2g}"]
        if name == FUSED_FREEU and DIFFUSERS_FREEU in outputs:
            parts.append(f"rel. diff vs diffusers FreeU {_relative_difference(out, outputs[DIFFUSERS_FREEU]):.2g}")
        checks[name] = "; ".join(parts)
    return checks


def iter_unet_level(model_keys: Sequence[str], device: torch.device, *, size: str = "auto", batch: int = 2,
                    reduced_latent_size: int = 32, compile_modes: bool = False, budget: TimingBudget = TimingBudget(seconds=3.0, min_reps=5),
                    environment: Dict, progress: Optional[TextIO] = sys.stderr) -> Iterator[List[Dict]]:
    """Rows of section "unet": each FreeU variant, eager (and compiled when asked), yielded per model as it
    finishes."""
    if size not in UNET_SIZES:
        raise ValueError(f"size must be one of {UNET_SIZES}, got {size!r}")
    reduced = size == "reduced" or (size == "auto" and device.type != "cuda")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    for key in model_keys:
        if key not in MODELS:
            raise ValueError(f"model_keys must be among {list(MODELS)}, got {key!r}")
        started = time.perf_counter()
        rows: List[Dict] = []
        model = MODELS[key]
        config = reduced_config(model.config, latent_size=reduced_latent_size) if reduced else model.config
        inputs = unet_inputs(config, batch, device, dtype, model.text_length)
        variants, notes = _freeu_variants(_build_unet(config, device, dtype), model)
        name = unet_case_name(model, reduced, batch)
        common = dict(case_name=name, dtype=SHORT_DTYPE[dtype], x_shape=str(tuple(inputs["sample"].shape)))
        reduction = REDUCTION_NOTE if reduced else ""
        calls, outputs = {}, {}
        for variant, unet in variants.items():
            try:
                outputs[variant] = _step(unet, inputs)()  # first call: caches, lazy init; never timed
            except Exception as error:  # noqa: BLE001 - a broken integration is a result, not a crash
                notes[variant] = f"failed: {type(error).__name__}: {error}"[:240]
                continue
            calls[variant] = _step(unet, inputs)
        profiles = {variant: profile_columns(call, device) for variant, call in calls.items()}
        checks = _output_checks(outputs)
        del outputs
        modes = [("eager", calls)]
        if compile_modes:
            modes.append(("compile", {variant: _step(torch.compile(variants[variant]), inputs) for variant in calls}))
        summary = []
        for mode, mode_calls in modes:
            timings, errors = measure_each(mode_calls, device, budget, flush_l2=False)
            rows += [result_row("unet", None, variant, mode, timing, environment, check=checks.get(variant, ""),
                                note=reduction, **common, **(profiles.get(variant, {}) if mode == "eager" else {}))
                     for variant, timing in timings.items()]
            rows += [result_row("unet", None, variant, mode, None, environment, note=error, **common)
                     for variant, error in errors.items()]
            summary += [f"{mode} {variant} {format_seconds(t.median_s)}" for variant, t in timings.items()]
        rows += [result_row("unet", None, variant, "eager", None, environment, note=note, **common)
                 for variant, note in notes.items()]
        if progress is not None:
            print(f"[unet] {name} {SHORT_DTYPE[dtype]}: " + " | ".join(summary)
                  + f"  [{time.perf_counter() - started:.1f} s]", file=progress, flush=True)
        del variants, calls, modes
        if device.type == "cuda":
            torch.cuda.empty_cache()
        yield rows
