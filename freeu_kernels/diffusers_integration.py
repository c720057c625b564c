"""Drop-in FreeU for diffusers U-Nets: every affected skip concat becomes one ``fused_concat`` call.

Supported models: UNet2DConditionModel (SD 1.x, 2.x, SDXL), UNet3DConditionModel (ModelScope, ZeroScope),
UNetMotionModel (AnimateDiff) and I2VGenXLUNet, or any pipeline whose ``.unet`` is one of them.

How the concat is replaced
    A diffusers up block pops a skip tensor, lets ``apply_freeu`` rewrite both tensors, then calls
    ``torch.cat``; nothing between the pop and the concat can be hooked without paying for the concat
    as well. So each affected up-block instance gets its own ``forward`` (an instance attribute, which
    ``nn.Module.__call__`` uses instead of the class method): a re-implementation of that block class's
    diffusers forward whose concat is one call site choosing, per concat, ``fused_concat`` (an affected
    concat) or ``torch.cat`` (any other). All six block classes share one loop (pop skip, concat, resnet,
    the block's per-layer modules, upsample); a small layout per class says which per-layer modules follow
    the resnet and how each is called. Arguments are bound by the parameter names of the class's own
    forward, so positional and keyword calls both work. ``disable_freeu`` deletes the instance attribute:
    the class forward is back and outputs are bit-identical to before.

Placement
    "diffusers": stage 1 (b1, s1) at every concat of the up block with ``resolution_idx`` 0, stage 2 at
    index 1, as diffusers' ``enable_freeu`` does, except that factors of 0 are honoured (diffusers turns
    FreeU off when any factor is 0). "official" (the official repository and ComfyUI): the stage is picked
    at each concat of every up block by the backbone's channel count, ``4 * block_out_channels[0]`` for
    stage 1 and ``2 * block_out_channels[0]`` for stage 2.

Factors, schedule and torch.compile
    b1, b2, s1, s2 live in 0-d float32 tensors on the U-Net's device. Calling ``enable_freeu`` again with
    the same options only writes new values into them, so a compiled U-Net reads them as graph inputs and
    neither recompiles nor bakes them into a CUDA graph. A forward pre-hook on the U-Net, made only of
    tensor operations (so it traces into a ``fullgraph=True`` compile without a break), turns a
    :class:`FreeUSchedule` into the factors of this call: ``where(active, factor, 1)``. Neutral factors
    (b = s = 1) make ``fused_concat`` a plain concat. ``active`` comes from the denoising progress of the
    call's timestep: its position in ``pipeline.scheduler.timesteps`` when FreeU was enabled through a
    pipeline (so ``pipe(prompt, num_inference_steps=N)`` needs nothing else), else the fraction of the
    training timesteps already denoised. The schedule's window is a pair of tensors as well:
    ``schedule.set(stop=0.5)`` between calls does not recompile either.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import types
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import torch

from .ops import fused_concat
from .presets import get_preset
from .spec import Backend, Mask

__all__ = ["enable_freeu", "disable_freeu", "freeu", "FreeUSchedule", "denoising_progress", "PLACEMENTS"]

PLACEMENTS = ("diffusers", "official")
FACTOR_NAMES = ("b1", "b2", "s1", "s2")
# Each stage's (backbone factor, skip factor); stage 0 is the paper's "first stage" (b1, s1).
_STAGE_FACTORS = (("b1", "s1"), ("b2", "s2"))
_SUPPORTED_UNETS = ("UNet2DConditionModel", "UNet3DConditionModel", "UNetMotionModel", "I2VGenXLUNet")
# Attribute names on the U-Net (its FreeU state) and on each patched up block (its call site).
_STATE_ATTRIBUTE = "_freeu_kernels_state"
_SITE_ATTRIBUTE = "_freeu_kernels_site"
# Timestep-fraction progress when no scheduler says how many steps the run has.
_DEFAULT_TRAIN_TIMESTEPS = 1000


# --------------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------------


def _check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(value).__name__}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def _check_window(start: float, stop: float) -> Tuple[float, float]:
    start, stop = _check_fraction("start", start), _check_fraction("stop", stop)
    if start > stop:
        raise ValueError(f"start must be <= stop, got start={start}, stop={stop}")
    return start, stop


def denoising_progress(timestep, timesteps: Optional[torch.Tensor] = None,
                       num_train_timesteps: int = _DEFAULT_TRAIN_TIMESTEPS,
                       device: Optional[torch.device] = None) -> torch.Tensor:
    """Fraction of the denoising already done when the U-Net is called at ``timestep``, a 0-d tensor.

    With the run's ``timesteps`` (a scheduler's descending ``timesteps``), step i of N gives i / N: the
    count of timesteps larger than ``timestep``. (Second-order schedulers list most timesteps twice; the
    count is then about twice the step index over about twice N, the same fraction.) Without them, the
    fraction of the training timesteps already denoised, ``(T - 1 - t) / T``, which is close to i / N for
    evenly spaced schedules. Only tensor operations: it traces into a compiled graph without a break.
    A batch of timesteps uses its first entry (diffusers pipelines give every sample the same one).
    """
    current = torch.as_tensor(timestep, device=device).reshape(-1)[0].to(torch.float32)
    if timesteps is not None and timesteps.numel() > 0:
        table = timesteps.to(device=current.device, dtype=torch.float32)
        return (table > current).sum().to(torch.float32) / table.numel()
    return (num_train_timesteps - 1 - current) / num_train_timesteps


class FreeUSchedule:
    """FreeU on for the part ``start <= progress < stop`` of the denoising, off (neutral factors) elsewhere.

    ``progress`` is i / N at step i of N (see :func:`denoising_progress`), so ``FreeUSchedule(stop=0.6)``
    runs FreeU for the first 60% of the steps, as the A1111 / Forge "stop at" settings do, and
    ``FreeUSchedule(start=0.2)`` skips the first 20%. Pass it as ``enable_freeu(..., schedule=...)`` (or a
    ``(start, stop)`` pair). The window is held in two 0-d tensors: :meth:`set` changes it in place, which a
    compiled U-Net sees without recompiling.
    """

    def __init__(self, start: float = 0.0, stop: float = 1.0):
        start, stop = _check_window(start, stop)
        self.window = (torch.tensor(start, dtype=torch.float32), torch.tensor(stop, dtype=torch.float32))

    @property
    def start(self) -> float:
        """First progress fraction with FreeU on."""
        return float(self.window[0])

    @property
    def stop(self) -> float:
        """First progress fraction with FreeU off again."""
        return float(self.window[1])

    def set(self, start: Optional[float] = None, stop: Optional[float] = None) -> "FreeUSchedule":
        """Change the window in place (None keeps a bound); a compiled U-Net does not recompile."""
        start, stop = _check_window(self.start if start is None else start, self.stop if stop is None else stop)
        self.window[0].fill_(start)
        self.window[1].fill_(stop)
        return self

    def is_active(self, progress: torch.Tensor) -> torch.Tensor:
        """Boolean 0-d tensor: whether FreeU is on at this progress fraction."""
        start, stop = (bound.to(progress.device) for bound in self.window)
        return (progress >= start) & (progress < stop)

    def to(self, device: Union[str, torch.device]) -> "FreeUSchedule":
        """Move the window tensors to ``device`` (the integration does this for the U-Net's device)."""
        device = torch.device(device)
        if self.window[0].device != device:
            self.window = tuple(bound.to(device) for bound in self.window)
        return self

    def __repr__(self) -> str:
        return f"FreeUSchedule(start={self.start}, stop={self.stop})"


def _as_schedule(schedule) -> Optional[FreeUSchedule]:
    if schedule is None or isinstance(schedule, FreeUSchedule):
        return schedule
    if isinstance(schedule, (tuple, list)) and len(schedule) == 2:
        return FreeUSchedule(*schedule)
    raise TypeError(
        f"schedule must be a FreeUSchedule, a (start, stop) pair or None, got {type(schedule).__name__}"
    )


# --------------------------------------------------------------------------------------------------
# Per-U-Net state: factor tensors, options, the pre-hook
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    """Everything that shapes the patched forwards; changing any of it re-installs FreeU (and recompiles)."""

    placement: str
    version: int
    threshold: int
    backend: Optional[str]
    mask: str
    high_gain: float


class _FreeUState:
    """FreeU's settings on one U-Net: the options, the factor tensors, the schedule and the pre-hook."""

    def __init__(self, options: _Options, factors: Mapping[str, float], schedule: Optional[FreeUSchedule],
                 pipeline, device: torch.device):
        self.options = options
        self.device = device
        self.factors = {
            name: torch.tensor(factors[name], dtype=torch.float32, device=device) for name in FACTOR_NAMES
        }
        self.pipeline = pipeline
        self.patched_blocks: list = []
        self.hook_handle = None
        self.use_schedule(schedule)

    def base_stage_factors(self) -> Tuple[Tuple[torch.Tensor, torch.Tensor], ...]:
        """((b1, s1), (b2, s2)): the factor tensors themselves, by stage."""
        return tuple((self.factors[b], self.factors[s]) for b, s in _STAGE_FACTORS)

    def use_schedule(self, schedule: Optional[FreeUSchedule]) -> None:
        self.schedule = None if schedule is None else schedule.to(self.device)
        # What the up blocks read. Without a schedule it stays the factor tensors themselves; with one the
        # pre-hook replaces it at every call.
        self.stage_factors = self.base_stage_factors()

    def set_factors(self, factors: Mapping[str, float]) -> None:
        # In place: the tensors a compiled graph was traced with keep their identity.
        for name in FACTOR_NAMES:
            self.factors[name].fill_(factors[name])

    def factor_values(self) -> Dict[str, float]:
        """The current factors as Python floats (what the context manager restores)."""
        return {name: float(tensor) for name, tensor in self.factors.items()}

    def move_to(self, device: torch.device) -> None:
        self.factors = {name: tensor.to(device) for name, tensor in self.factors.items()}
        self.device = device
        self.use_schedule(self.schedule)

    def timesteps_of_run(self) -> Tuple[Optional[torch.Tensor], int]:
        """The pipeline scheduler's current timesteps (None without a pipeline) and its training length."""
        scheduler = getattr(self.pipeline, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        config = getattr(scheduler, "config", None)
        train_timesteps = getattr(config, "num_train_timesteps", None) or _DEFAULT_TRAIN_TIMESTEPS
        return (timesteps if isinstance(timesteps, torch.Tensor) else None), int(train_timesteps)

    def before_unet_forward(self, unet, args, kwargs) -> None:
        """Forward pre-hook: keep the factors on the sample's device, then apply the schedule to this call."""
        sample = kwargs["sample"] if "sample" in kwargs else (args[0] if args else None)
        if isinstance(sample, torch.Tensor) and sample.device != self.device:
            # Happens once after the model moved (pipe.to("cuda") after enable_freeu); factors that stay on
            # the CPU would be read on the host, which CUDA graphs would bake in.
            self.move_to(sample.device)
        if self.schedule is None:
            return None
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        timesteps, train_timesteps = self.timesteps_of_run()
        active = self.schedule.is_active(denoising_progress(timestep, timesteps, train_timesteps, self.device))
        self.stage_factors = tuple(
            (torch.where(active, backbone, 1.0), torch.where(active, skip, 1.0))
            for backbone, skip in self.base_stage_factors()
        )
        return None


# --------------------------------------------------------------------------------------------------
# The replacement up-block forward
# --------------------------------------------------------------------------------------------------

LayerStep = Callable[[torch.nn.Module, torch.Tensor, Dict[str, Any]], torch.Tensor]


def _cross_attention(attention: torch.nn.Module, hidden: torch.Tensor, call: Dict[str, Any]) -> torch.Tensor:
    """A spatial Transformer2DModel; blocks whose diffusers forward passes no masks have None for them."""
    return attention(
        hidden,
        encoder_hidden_states=call["encoder_hidden_states"],
        cross_attention_kwargs=call["cross_attention_kwargs"],
        attention_mask=call.get("attention_mask"),
        encoder_attention_mask=call.get("encoder_attention_mask"),
        return_dict=False,
    )[0]


def _across_frames(module: torch.nn.Module, hidden: torch.Tensor, call: Dict[str, Any]) -> torch.Tensor:
    """A temporal conv or motion module: it unfolds the frames that video U-Nets fold into the batch."""
    return module(hidden, num_frames=call["num_frames"])


def _temporal_attention(attention: torch.nn.Module, hidden: torch.Tensor, call: Dict[str, Any]) -> torch.Tensor:
    """UNet3D's TransformerTemporalModel: attention across frames."""
    return attention(
        hidden,
        num_frames=call["num_frames"],
        cross_attention_kwargs=call["cross_attention_kwargs"],
        return_dict=False,
    )[0]


# The forward arguments each per-layer step reads, checked against the block's signature at enable time.
_ARGUMENTS_READ: Dict[LayerStep, Tuple[str, ...]] = {
    _cross_attention: ("encoder_hidden_states", "cross_attention_kwargs"),
    _across_frames: ("num_frames",),
    _temporal_attention: ("num_frames", "cross_attention_kwargs"),
}
# Read by the shared loop of every up block.
_LOOP_ARGUMENTS = ("hidden_states", "res_hidden_states_tuple", "temb", "upsample_size")


@dataclass(frozen=True)
class _BlockLayout:
    """What one diffusers up-block class does around the loop all of them share.

    ``layer_steps``: after the i-th resnet, for each (ModuleList attribute, step), ``step(block.<attr>[i])``.
    ``checkpoints_resnet``: the diffusers forward runs the resnet under gradient checkpointing when the block
    has it on and grad is enabled. ``unused_parameters``: accepted by the diffusers forward but never used
    (UNet3D's cross-attention up block ignores ``attention_mask``), so they are forced to None.
    """

    layer_steps: Tuple[Tuple[str, LayerStep], ...]
    checkpoints_resnet: bool
    unused_parameters: Tuple[str, ...] = ()

    def arguments_read(self) -> set:
        """Names of the forward arguments the replacement forward reads for this class."""
        return set(_LOOP_ARGUMENTS).union(*(_ARGUMENTS_READ[step] for _, step in self.layer_steps))


def _block_layouts() -> Dict[type, _BlockLayout]:
    """The supported diffusers up-block classes and their layouts (imported here: diffusers is optional)."""
    from diffusers.models.unets.unet_2d_blocks import CrossAttnUpBlock2D, UpBlock2D
    from diffusers.models.unets.unet_3d_blocks import CrossAttnUpBlock3D, UpBlock3D
    from diffusers.models.unets.unet_motion_model import CrossAttnUpBlockMotion, UpBlockMotion

    return {
        CrossAttnUpBlock2D: _BlockLayout((("attentions", _cross_attention),), checkpoints_resnet=True),
        UpBlock2D: _BlockLayout((), checkpoints_resnet=True),
        CrossAttnUpBlock3D: _BlockLayout(
            (
                ("temp_convs", _across_frames),
                ("attentions", _cross_attention),
                ("temp_attentions", _temporal_attention),
            ),
            checkpoints_resnet=False,
            unused_parameters=("attention_mask",),
        ),
        UpBlock3D: _BlockLayout((("temp_convs", _across_frames),), checkpoints_resnet=False),
        CrossAttnUpBlockMotion: _BlockLayout(
            (("attentions", _cross_attention), ("motion_modules", _across_frames)), checkpoints_resnet=True
        ),
        UpBlockMotion: _BlockLayout((("motion_modules", _across_frames),), checkpoints_resnet=True),
    }


@dataclass(frozen=True)
class _Site:
    """What the replacement forward of one up block needs, fixed when FreeU is enabled."""

    layout: _BlockLayout
    parameter_names: Tuple[str, ...]  # the class forward's named parameters after self, in positional order
    defaults: Dict[str, Any]
    state: _FreeUState
    fixed_stage: Optional[int]  # "diffusers" placement: this block's stage (None under "official")
    stage_by_channels: Optional[Dict[int, int]]  # "official" placement: backbone channels -> stage

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Dict[str, Any]:
        """The call's arguments by name, the way the class forward would have received them."""
        call = dict(self.defaults)
        call.update(zip(self.parameter_names, args))
        call.update(kwargs)  # extra keywords (diffusers' deprecated "scale") are kept and ignored
        for name in self.layout.unused_parameters:
            call[name] = None
        return call

    def concat(self, backbone: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``cat([backbone, skip], 1)``, with FreeU fused in when this concat belongs to a stage."""
        if self.stage_by_channels is None:
            stage = self.fixed_stage
        else:
            stage = self.stage_by_channels.get(backbone.shape[1])
        if stage is None:
            return torch.cat([backbone, skip], dim=1)
        backbone_factor, skip_factor = self.state.stage_factors[stage]
        options = self.state.options
        return fused_concat(
            backbone, skip, backbone_factor, skip_factor,
            threshold=options.threshold, backend=options.backend, version=options.version,
            high_gain=options.high_gain, mask=options.mask,
        )


def _up_block_forward(block: torch.nn.Module, *args, **kwargs) -> torch.Tensor:
    """diffusers' up-block forward with the skip concat going through :meth:`_Site.concat`.

    Bound to one block instance as its ``forward``. Same order of operations as the diffusers forward of
    every supported class: for each resnet, take the last remaining skip tensor (the deepest encoder feature
    comes first), concat, resnet, then the block's per-layer modules; upsample at the end.
    """
    site: _Site = getattr(block, _SITE_ATTRIBUTE)
    call = site.bind(args, kwargs)
    hidden = call["hidden_states"]
    skips = call["res_hidden_states_tuple"]
    temb = call["temb"]
    for index, resnet in enumerate(block.resnets):
        skip = skips[-1]
        skips = skips[:-1]
        hidden = site.concat(hidden, skip)
        if site.layout.checkpoints_resnet and torch.is_grad_enabled() and block.gradient_checkpointing:
            hidden = block._gradient_checkpointing_func(resnet, hidden, temb)
        else:
            hidden = resnet(hidden, temb)
        for attribute, step in site.layout.layer_steps:
            hidden = step(getattr(block, attribute)[index], hidden, call)
    if block.upsamplers is not None:
        for upsampler in block.upsamplers:
            hidden = upsampler(hidden, call["upsample_size"])
    return hidden


# --------------------------------------------------------------------------------------------------
# Argument checks and model resolution
# --------------------------------------------------------------------------------------------------


def _supported_unet_classes() -> Tuple[type, ...]:
    import diffusers

    return tuple(getattr(diffusers, name) for name in _SUPPORTED_UNETS)


def _resolve_unet(model) -> Tuple[torch.nn.Module, Any]:
    """(the U-Net, the pipeline or None) for a pipeline, a U-Net or a torch.compile wrapper of either."""
    supported = _supported_unet_classes()
    pipeline = None
    unet = getattr(model, "_orig_mod", model)  # torch.compile(unet) wraps the module
    if not isinstance(unet, supported) and hasattr(model, "unet"):
        pipeline = model
        unet = getattr(model.unet, "_orig_mod", model.unet)
    if not isinstance(unet, supported):
        raise TypeError(
            f"model must be a diffusers pipeline with a .unet, or one of {', '.join(_SUPPORTED_UNETS)}; "
            f"got {type(unet).__name__}"
        )
    return unet, pipeline


def _check_factor(name: str, value) -> float:
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _resolve_factors(preset, given: Mapping[str, Any]) -> Dict[str, float]:
    """Explicit factors override the preset's; all four must end up known."""
    factors = dict(get_preset(preset).as_kwargs()) if preset is not None else {}
    factors.update({name: value for name, value in given.items() if value is not None})
    missing = [name for name in FACTOR_NAMES if name not in factors]
    if missing:
        raise TypeError(f"enable_freeu needs the factors {missing} (pass them, or preset=...)")
    return {name: _check_factor(name, factors[name]) for name in FACTOR_NAMES}


def _make_options(placement, version, threshold, backend, mask, high_gain) -> _Options:
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if isinstance(version, bool) or version not in (1, 2):
        raise ValueError(f"version must be 1 or 2, got {version!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Integral):
        raise TypeError(f"threshold must be an int, got {type(threshold).__name__}")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    if backend is not None:
        try:
            backend = Backend(getattr(backend, "value", backend)).value
        except ValueError:
            choices = [b.value for b in Backend]
            raise ValueError(f"backend must be None or one of {choices}, got {backend!r}") from None
    try:
        mask = Mask(mask).value
    except ValueError:
        raise ValueError(f"mask must be one of {[m.value for m in Mask]}, got {mask!r}") from None
    return _Options(placement, int(version), int(threshold), backend, mask, _check_factor("high_gain", high_gain))


def _module_device(module: torch.nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# Installing and removing
# --------------------------------------------------------------------------------------------------


def _layout_of(block: torch.nn.Module, layouts: Dict[type, _BlockLayout]) -> Optional[Tuple[type, _BlockLayout]]:
    """The supported class ``block`` is an instance of, with its layout; None if it is none of them.

    A subclass that overrides ``forward`` cannot be mirrored faithfully: TypeError naming it.
    """
    for cls, layout in layouts.items():
        if isinstance(block, cls):
            if type(block).forward is not cls.forward:
                raise TypeError(
                    f"model has an up block of class {type(block).__name__}, which overrides "
                    f"{cls.__name__}.forward; FreeU cannot replace its concat"
                )
            return cls, layout
    return None


def _site_for(block: torch.nn.Module, cls: type, layout: _BlockLayout, state: _FreeUState,
              model_channels: int) -> Optional[_Site]:
    """The call site of one up block, or None when no concat of it is affected under this placement."""
    if state.options.placement == "diffusers":
        fixed_stage = {0: 0, 1: 1}.get(getattr(block, "resolution_idx", None))
        if fixed_stage is None:
            return None
        stage_by_channels = None
    else:
        fixed_stage = None
        stage_by_channels = {4 * model_channels: 0, 2 * model_channels: 1}
    parameters = [
        p for p in list(inspect.signature(cls.forward).parameters.values())[1:]
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    names = tuple(p.name for p in parameters if p.kind is not p.KEYWORD_ONLY)
    missing = layout.arguments_read() - {p.name for p in parameters}
    if missing:
        raise TypeError(
            f"model's up block {cls.__name__} has a forward without {sorted(missing)}: "
            "this diffusers version is not supported"
        )
    defaults = {p.name: (None if p.default is p.empty else p.default) for p in parameters}
    return _Site(layout, names, defaults, state, fixed_stage, stage_by_channels)


def _install(unet: torch.nn.Module, state: _FreeUState) -> None:
    layouts = _block_layouts()
    model_channels = int(unet.config.block_out_channels[0])
    sites = []
    for block in unet.up_blocks:
        found = _layout_of(block, layouts)
        if found is None:
            if state.options.placement == "official":
                warnings.warn(f"FreeU: up block {type(block).__name__} is not supported; its concats stay plain")
            continue
        site = _site_for(block, *found, state, model_channels)
        if site is None:
            continue
        if "forward" in vars(block):
            raise ValueError(
                f"model's up block {type(block).__name__} already has an instance-level forward (another patch "
                "or hook); enable FreeU before it is added"
            )
        sites.append((block, site))
    # Everything is checked: now patch, so a failure above leaves the model untouched.
    for block, site in sites:
        setattr(block, _SITE_ATTRIBUTE, site)
        block.forward = types.MethodType(_up_block_forward, block)
        state.patched_blocks.append(block)
    state.hook_handle = unet.register_forward_pre_hook(state.before_unet_forward, with_kwargs=True)
    setattr(unet, _STATE_ATTRIBUTE, state)


def _uninstall(unet: torch.nn.Module) -> None:
    state: Optional[_FreeUState] = getattr(unet, _STATE_ATTRIBUTE, None)
    if state is None:
        return
    state.hook_handle.remove()
    for block in state.patched_blocks:
        del block.forward  # the class's own forward is used again
        delattr(block, _SITE_ATTRIBUTE)
    delattr(unet, _STATE_ATTRIBUTE)


def _apply(unet: torch.nn.Module, pipeline, options: _Options, factors: Mapping[str, float],
           schedule: Optional[FreeUSchedule]) -> None:
    state: Optional[_FreeUState] = getattr(unet, _STATE_ATTRIBUTE, None)
    if state is not None and state.options == options:
        # Same structure: only values change, so a compiled U-Net keeps its graph.
        state.set_factors(factors)
        state.use_schedule(schedule)
        state.pipeline = pipeline if pipeline is not None else state.pipeline
        return
    _uninstall(unet)
    _install(unet, _FreeUState(options, factors, schedule, pipeline, _module_device(unet)))


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def enable_freeu(
    model,
    b1: Optional[float] = None,
    b2: Optional[float] = None,
    s1: Optional[float] = None,
    s2: Optional[float] = None,
    *,
    preset: Optional[str] = None,
    version: int = 1,
    placement: str = "diffusers",
    backend: Optional[str] = None,
    threshold: int = 1,
    mask: str = "box",
    high_gain: float = 1.0,
    schedule: Union[FreeUSchedule, Tuple[float, float], None] = None,
) -> None:
    """Turn FreeU on in a diffusers U-Net (or a pipeline's ``.unet``), each affected concat fused into one op.

    Args:
        model: a pipeline with ``.unet`` or the U-Net: UNet2DConditionModel, UNet3DConditionModel,
            UNetMotionModel or I2VGenXLUNet (a ``torch.compile`` wrapper of one works too). Anything else
            raises TypeError naming its class.
        b1, b2: backbone factors of stages 1 and 2. s1, s2: skip factors (gain of the lowest frequencies).
            Factors of 0 are applied as given.
        preset: a name from :data:`freeu_kernels.PRESETS` ("sd15", "sdxl", ...); explicit factors override it.
        version: 1 (scale half the backbone channels by b) or 2 (by ``(b - 1) * m^ + 1``, the structure map).
        placement: "diffusers" (stages on up blocks 0 and 1, like ``unet.enable_freeu``) or "official"
            (stage by the backbone's channel count at each concat, like the official code and ComfyUI).
        backend: None/"auto", "torch", "cpu", "triton" or "cuda" (see :func:`freeu_kernels.fused_concat`).
        threshold, mask, high_gain: the skip filter's low-frequency region and the gain outside it.
        schedule: a :class:`FreeUSchedule` or ``(start, stop)`` progress fractions; None means every step.

    Calling it again with the same version, placement, backend, threshold, mask and high_gain only updates
    the factors and the schedule in place (a compiled U-Net does not recompile); other changes re-install.
    While it is on, diffusers' own ``unet.enable_freeu`` settings have no effect on the patched blocks.
    """
    unet, pipeline = _resolve_unet(model)
    factors = _resolve_factors(preset, {"b1": b1, "b2": b2, "s1": s1, "s2": s2})
    options = _make_options(placement, version, threshold, backend, mask, high_gain)
    _apply(unet, pipeline, options, factors, _as_schedule(schedule))


def disable_freeu(model) -> None:
    """Turn this package's FreeU off: the up blocks run their own diffusers forward again, bit for bit.

    ``model`` is what :func:`enable_freeu` takes. Nothing happens if FreeU was not enabled. diffusers' own
    ``unet.enable_freeu`` settings, if any, are left as they are.
    """
    unet, _ = _resolve_unet(model)
    _uninstall(unet)


@contextlib.contextmanager
def freeu(model, *args, **kwargs) -> Iterator[Any]:
    """``with freeu(pipe, preset="sd15"):`` FreeU on inside the block, the previous setting restored after.

    Takes the arguments of :func:`enable_freeu`. On exit, FreeU is disabled if it was off before, or the
    previous factors, options and schedule are put back (in place when the options are the same).
    """
    unet, _ = _resolve_unet(model)
    previous: Optional[_FreeUState] = getattr(unet, _STATE_ATTRIBUTE, None)
    saved = None
    if previous is not None:
        saved = (previous.pipeline, previous.options, previous.factor_values(), previous.schedule)
    enable_freeu(model, *args, **kwargs)
    try:
        yield model
    finally:
        if saved is None:
            _uninstall(unet)
        else:
            _apply(unet, *saved)
