"""Drop-in FreeU for diffusers U-Nets: every affected skip concat becomes one ``fused_concat`` call.

Supported models: UNet2DConditionModel (SD 1.x, 2.x, SDXL), UNet3DConditionModel (ModelScope, ZeroScope),
UNetMotionModel (AnimateDiff), I2VGenXLUNet and UNetControlNetXSModel (ControlNet-XS), or any pipeline
whose ``.unet`` is one of them.

How the concat is replaced
    A diffusers up block pops a skip tensor, lets ``apply_freeu`` rewrite both tensors, then calls
    ``torch.cat``; nothing between the pop and the concat can be hooked without paying for the concat
    as well. So each affected up-block instance gets its own ``forward`` (an instance attribute, which
    ``nn.Module.__call__`` uses instead of the class method): a re-implementation of that block class's
    diffusers forward whose concat is one call site choosing, per concat, ``fused_concat`` (an affected
    concat) or ``torch.cat`` (any other). Six block classes share one loop (pop skip, concat, resnet,
    the block's per-layer modules, upsample); a small layout per class says which per-layer modules follow
    the resnet and how each is called. ControlNet-XS's up block adds the control branch before each concat
    and has its own short forward. Arguments are bound by the parameter names of the class's own forward,
    so positional and keyword calls both work. ``disable_freeu`` deletes the instance attribute: the class
    forward is back and outputs are bit-identical to before.

Placement: which concats run FreeU, with which stage
    "diffusers": stage 1 (b1, s1) at every concat of the up block with ``resolution_idx`` 0, stage 2 at
    index 1, as diffusers' ``enable_freeu`` does, except that factors of 0 are honoured (diffusers turns
    FreeU off when any factor is 0). "official" (the official repository, ComfyUI, Forge and the A1111
    extension): the stage is picked at each concat of every up block by the backbone's channel count,
    ``4 * block_out_channels[0]`` for stage 1 and ``2 * block_out_channels[0]`` for stage 2, or the keys
    of ``stages=`` (any number of stages, each a :class:`~.stages.FreeUStage` with its own factors,
    channel window, skip filter and version).

Factors, schedule and torch.compile
    Each stage's backbone and skip factors live in 0-d float32 tensors on the U-Net's device. Calling
    ``enable_freeu`` again with the same structure (everything but the factors and the schedule's
    numbers) only writes new values into them, so a compiled U-Net reads them as graph inputs and neither
    recompiles nor bakes them into a CUDA graph. A forward pre-hook on the U-Net, made only of tensor
    operations (so it traces into a ``fullgraph=True`` compile without a break), turns a
    :class:`~.stages.FreeUSchedule` into this call's strength r and each factor f into ``lerp(1, f, r)``.
    Neutral factors (b = s = 1) make ``fused_concat`` a plain concat. The step comes from the call's
    timestep: its position in ``pipeline.scheduler.timesteps`` when FreeU was enabled through a pipeline
    (so ``pipe(prompt, num_inference_steps=N)`` needs nothing else), else the training timesteps already
    denoised. ``fused_concat``'s ``high_gain`` is a Python float (a graph constant); a stage whose
    high_gain is not 1 under a schedule is ramped exactly through the filter's linearity,
    ``filter(h; s, g) = filter(h; s - g + 1, 1) + (g - 1) h``, at the cost of one extra pass over the
    skip half of the output.
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
import types
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..ops import resolve_backend
from ..spec import Backend
from .presets import FreeUPreset, lookup_preset
from .stages import (
    FreeUSchedule,
    FreeUStage,
    as_schedule,
    check_mask,
    check_real,
    check_threshold,
    check_version,
    denoising_progress,
    denoising_step,
    DEFAULT_TRAIN_TIMESTEPS,
)

__all__ = ["enable_freeu", "disable_freeu", "freeu", "FreeUSchedule", "FreeUStage", "denoising_progress",
           "PLACEMENTS"]

PLACEMENTS = ("diffusers", "official")
FACTOR_NAMES = ("b1", "b2", "s1", "s2")
_SUPPORTED_UNETS = (
    "UNet2DConditionModel", "UNet3DConditionModel", "UNetMotionModel", "I2VGenXLUNet", "UNetControlNetXSModel",
)
# Attribute names on the U-Net (its FreeU state) and on each patched up block (its call site).
_STATE_ATTRIBUTE = "_freeu_kernels_state"
_SITE_ATTRIBUTE = "_freeu_kernels_site"


# --------------------------------------------------------------------------------------------------
# Per-U-Net state: the stages, their factor tensors, the schedule and the pre-hook
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    """Everything that shapes the patched forwards; changing any of it re-installs FreeU (and recompiles).

    ``stage_channels``: under "official", the backbone channel count of each stage (None under
    "diffusers", where stage i is the up block with ``resolution_idx`` i). ``structures``: each stage's
    settings but its two factors.
    """

    placement: str
    stage_channels: Optional[Tuple[int, ...]]
    structures: Tuple[tuple, ...]
    backend: Optional[str]


class _FreeUState:
    """FreeU's settings on one U-Net: the options, the stages, their factor tensors, schedule and pre-hook."""

    def __init__(self, options: _Options, stages: Sequence[FreeUStage], schedule: Optional[FreeUSchedule],
                 pipeline, device: torch.device):
        self.options = options
        self.device = device
        self.stages = tuple(stages)
        # Never inference tensors, even when FreeU is enabled under inference_mode: they outlive the call,
        # set_stages updates them in place and a forward with autograd on saves them for backward, both of
        # which an inference tensor refuses outside inference_mode.
        with torch.inference_mode(False):
            self.factor_tensors = tuple(
                (torch.tensor(stage.backbone_factor, dtype=torch.float32, device=device),
                 torch.tensor(stage.skip_factor, dtype=torch.float32, device=device))
                for stage in self.stages
            )
        self.pipeline = pipeline
        self.patched_blocks: list = []
        self.hook_handle = None
        self.use_schedule(schedule)

    def use_schedule(self, schedule: Optional[FreeUSchedule]) -> None:
        self.schedule = None if schedule is None else schedule.to(self.device)
        # What the up blocks read: per stage (b, s, ramped high gain or None). Without a schedule these are
        # the factor tensors themselves; with one the pre-hook replaces them at every call.
        self.stage_factors = tuple((b, s, None) for b, s in self.factor_tensors)

    def set_stages(self, stages: Sequence[FreeUStage]) -> None:
        # In place: the tensors a compiled graph was traced with keep their identity.
        self.stages = tuple(stages)
        for (b, s), stage in zip(self.factor_tensors, self.stages):
            b.fill_(stage.backbone_factor)
            s.fill_(stage.skip_factor)

    def factor_values(self) -> Dict[str, float]:
        """The factors as Python floats: b1, s1, b2, s2, ... by stage order."""
        values = {}
        for index, (b, s) in enumerate(self.factor_tensors, start=1):
            values[f"b{index}"], values[f"s{index}"] = float(b), float(s)
        return values

    def move_to(self, device: torch.device) -> None:
        """After the model moved: check the backend can run there, then move the factor tensors."""
        _check_backend_runs_on(self.options.backend, device, moved=True)
        with torch.inference_mode(False):  # as in __init__: the moved tensors outlive this call
            self.factor_tensors = tuple((b.to(device), s.to(device)) for b, s in self.factor_tensors)
        self.device = device
        self.use_schedule(self.schedule)

    def timesteps_of_run(self) -> Tuple[Optional[torch.Tensor], int]:
        """The pipeline scheduler's current timesteps (None without a pipeline) and its training length."""
        scheduler = getattr(self.pipeline, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        config = getattr(scheduler, "config", None)
        train_timesteps = getattr(config, "num_train_timesteps", None) or DEFAULT_TRAIN_TIMESTEPS
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
        step, steps = denoising_step(timestep, timesteps, train_timesteps, self.device, self.schedule.values.dtype)
        strength = self.schedule.strength(step, steps).to(torch.float32)

        def ramp(factor: torch.Tensor) -> torch.Tensor:
            # torch.lerp returns its end points exactly (strength 0 gives 1, strength 1 the factor).
            return torch.lerp(torch.ones_like(factor), factor, strength)

        self.stage_factors = tuple(
            (ramp(b), ramp(s), None if stage.high_gain == 1.0 else ramp(torch.full_like(b, stage.high_gain)))
            for (b, s), stage in zip(self.factor_tensors, self.stages)
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


def _block_layouts() -> Dict[type, Optional[_BlockLayout]]:
    """The supported diffusers up-block classes and their layouts (imported here: diffusers is optional).

    ControlNet-XS's up block maps to None: it has its own replacement forward.
    """
    try:
        from diffusers.models.controlnets.controlnet_xs import ControlNetXSCrossAttnUpBlock2D
    except ImportError:  # diffusers < 0.31 kept it at the top of diffusers.models
        from diffusers.models.controlnet_xs import ControlNetXSCrossAttnUpBlock2D
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
        ControlNetXSCrossAttnUpBlock2D: None,
    }


@dataclass(frozen=True)
class _Site:
    """What the replacement forward of one up block needs, fixed when FreeU is enabled."""

    layout: Optional[_BlockLayout]  # None for ControlNet-XS's up block, which has its own forward
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
        for name in (self.layout.unused_parameters if self.layout is not None else ()):
            call[name] = None
        return call

    def concat(self, backbone: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``cat([backbone, skip], 1)``, with FreeU fused in when this concat belongs to a stage."""
        if self.stage_by_channels is None:
            index = self.fixed_stage
        else:
            index = self.stage_by_channels.get(backbone.shape[1])
        if index is None:
            return torch.cat([backbone, skip], dim=1)
        backbone_factor, skip_factor, ramped_high_gain = self.state.stage_factors[index]
        return self.state.stages[index].concat(
            backbone, skip, backbone_factor=backbone_factor, skip_factor=skip_factor, high_gain=ramped_high_gain,
            backend=self.state.options.backend,
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


# ControlNet-XS's up block reads these arguments (checked against its forward's signature at enable time).
_CONTROLNET_XS_ARGUMENTS = frozenset((
    "hidden_states", "res_hidden_states_tuple_base", "res_hidden_states_tuple_ctrl", "temb",
    "encoder_hidden_states", "conditioning_scale", "cross_attention_kwargs", "attention_mask",
    "upsample_size", "encoder_attention_mask", "apply_control",
))


def _controlnet_xs_up_block_forward(block: torch.nn.Module, *args, **kwargs) -> torch.Tensor:
    """diffusers' ControlNetXSCrossAttnUpBlock2D forward with the base-skip concat through :meth:`_Site.concat`.

    Per layer: add the control branch's skip (through its zero conv, times ``conditioning_scale``) to the
    hidden states, concat the base U-Net's skip (FreeU here, as diffusers places it), resnet, attention
    (when the layer has one); one upsampler at the end.
    """
    site: _Site = getattr(block, _SITE_ATTRIBUTE)
    call = site.bind(args, kwargs)
    hidden = call["hidden_states"]
    temb = call["temb"]
    layers = zip(block.resnets, block.attentions, block.ctrl_to_base,
                 reversed(call["res_hidden_states_tuple_base"]), reversed(call["res_hidden_states_tuple_ctrl"]))
    for resnet, attention, ctrl_to_base, skip_base, skip_ctrl in layers:
        if call["apply_control"]:
            hidden = hidden + ctrl_to_base(skip_ctrl) * call["conditioning_scale"]
        hidden = site.concat(hidden, skip_base)
        if torch.is_grad_enabled() and block.gradient_checkpointing:
            hidden = block._gradient_checkpointing_func(resnet, hidden, temb)
        else:
            hidden = resnet(hidden, temb)
        if attention is not None:
            hidden = attention(
                hidden,
                encoder_hidden_states=call["encoder_hidden_states"],
                cross_attention_kwargs=call["cross_attention_kwargs"],
                attention_mask=call["attention_mask"],
                encoder_attention_mask=call["encoder_attention_mask"],
                return_dict=False,
            )[0]
    if block.upsamplers is not None:
        hidden = block.upsamplers(hidden, call["upsample_size"])
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


def _module_device(module: torch.nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _check_backend(backend) -> Optional[str]:
    if backend is None:
        return None
    try:
        return Backend(getattr(backend, "value", backend)).value
    except ValueError:
        choices = [b.value for b in Backend]
        raise ValueError(f"backend must be None or one of {choices}, got {backend!r}") from None


def _check_backend_runs_on(backend: Optional[str], device: torch.device, *, moved: bool = False) -> None:
    """ValueError now, rather than at the first denoising step, when ``backend`` cannot run on ``device``."""
    try:
        resolve_backend(backend, device)  # None: $FREEU_KERNELS_BACKEND, else the automatic choice
    except ValueError as error:
        where = f"the model now runs on {device} (it moved after enable_freeu)" if moved else \
            f"the model is on {device}"
        raise ValueError(
            f"backend={backend!r} cannot run where FreeU runs: {where}. {error}. "
            f"Call enable_freeu(..., backend=None) or pick a backend for {device.type} tensors."
        ) from None


def _reject_positional_factors(positional: tuple) -> None:
    """enable_freeu(model, 1.5, 1.6, 0.9, 0.2) is refused: diffusers' order (s1, s2, b1, b2) differs."""
    if not positional:
        return
    values = ", ".join(repr(v) for v in positional)
    hint = ""
    if len(positional) == 4:
        ours = ", ".join(f"{n}={v!r}" for n, v in zip(("b1", "b2", "s1", "s2"), positional))
        theirs = ", ".join(f"{n}={v!r}" for n, v in zip(("s1", "s2", "b1", "b2"), positional))
        hint = (f" Ported from diffusers' pipe.enable_freeu({values}) (skip factors first)? Write "
                f"enable_freeu(model, {theirs}). Meant backbone factors first? Write enable_freeu(model, {ours}).")
    raise TypeError(
        f"enable_freeu takes the factors by keyword only (b1=, b2=, s1=, s2=), got {len(positional)} "
        f"positional value(s) after the model: {values}.{hint}"
    )


def _stages_from_mapping(stages) -> Dict[int, FreeUStage]:
    """``stages=``: {backbone channel count: FreeUStage or a mapping of FreeUStage's fields}."""
    if not isinstance(stages, Mapping) or not stages:
        raise TypeError(f"stages must be a non-empty mapping {{channel count: FreeUStage}}, got {stages!r}")
    checked = {}
    for channels, stage in stages.items():
        if isinstance(channels, bool) or not isinstance(channels, numbers.Integral) or channels <= 0:
            raise ValueError(f"stages keys must be backbone channel counts (ints > 0), got {channels!r}")
        if isinstance(stage, Mapping):
            stage = FreeUStage(**stage)
        if not isinstance(stage, FreeUStage):
            raise TypeError(f"stages[{channels}] must be a FreeUStage or a mapping of its fields, "
                            f"got {type(stage).__name__}")
        checked[int(channels)] = stage
    return checked


def _two_stages(preset: Optional[FreeUPreset], given: Mapping[str, Any]) -> Tuple[FreeUStage, FreeUStage]:
    """Stage 1 (b1, s1) and stage 2 (b2, s2): explicit factors override the preset's; all four needed."""
    factors = dict(preset.as_kwargs()) if preset is not None else {}
    factors.update({name: value for name, value in given.items() if value is not None})
    missing = [name for name in FACTOR_NAMES if name not in factors]
    if missing:
        raise TypeError(f"enable_freeu needs the factors {missing} (pass them, or preset=..., or stages=...)")
    factors = {name: check_real(name, factors[name]) for name in FACTOR_NAMES}
    return FreeUStage(factors["b1"], factors["s1"]), FreeUStage(factors["b2"], factors["s2"])


def _override_factors(stage: FreeUStage, backbone_factor, skip_factor, names: Tuple[str, str]) -> FreeUStage:
    changes = {}
    if backbone_factor is not None:
        changes["backbone_factor"] = check_real(names[0], backbone_factor)
    if skip_factor is not None:
        changes["skip_factor"] = check_real(names[1], skip_factor)
    return replace(stage, **changes) if changes else stage


def _check_resolved(stage: FreeUStage, where: str) -> FreeUStage:
    """The settings the op cannot take together, refused at enable time (naming the setting)."""
    if stage.mask == "radial" and (isinstance(stage.threshold, tuple) or stage.cutoff is not None):
        setting = "threshold" if stage.cutoff is None else "cutoff"
        raise ValueError(f"{where}: mask='radial' needs a square threshold (an int); {setting} gives a "
                         "rectangular box, which only mask='box' has")
    return stage


def _resolve_stages(unet, preset, stages, given_factors, placement, version, threshold, mask, high_gain
                    ) -> Tuple[str, Optional[Tuple[int, ...]], Tuple[FreeUStage, ...]]:
    """(placement, stage channel counts or None, resolved stages) from enable_freeu's arguments."""
    model_channels = int(unet.config.block_out_channels[0])
    if placement is not None and placement not in PLACEMENTS:
        raise ValueError(f"placement must be None or one of {PLACEMENTS}, got {placement!r}")
    placement = placement if placement is not None else (preset.placement if preset is not None else None)
    if stages is not None or (preset is not None and preset.stages is not None):
        if placement == "diffusers":
            raise ValueError("placement must be 'official' (or None) with stages: stages are keyed by the "
                             "backbone's channel count, not by up block")
        if stages is not None:
            if any(value is not None for value in given_factors.values()):
                raise TypeError("enable_freeu takes either stages= or the factors b1, b2, s1, s2, not both")
            by_channels = _stages_from_mapping(stages)
        else:
            by_channels = {multiple * model_channels: stage for multiple, stage in preset.stages}
            # b1/s1 and b2/s2 still name the stages at 4x and 2x the model channels.
            for channels, names in ((4 * model_channels, ("b1", "s1")), (2 * model_channels, ("b2", "s2"))):
                if channels in by_channels:
                    by_channels[channels] = _override_factors(
                        by_channels[channels], given_factors[names[0]], given_factors[names[1]], names)
        placement, stage_channels = "official", tuple(by_channels)
        chosen = tuple(by_channels.values())
    else:
        placement = placement or "diffusers"
        chosen = _two_stages(preset, given_factors)
        stage_channels = (4 * model_channels, 2 * model_channels) if placement == "official" else None
    defaults = dict(high_gain=high_gain, threshold=threshold, version=version, mask=mask)
    resolved = tuple(
        _check_resolved(stage.with_defaults(**defaults), f"stage {index + 1}") for index, stage in enumerate(chosen)
    )
    return placement, stage_channels, resolved


# --------------------------------------------------------------------------------------------------
# Installing and removing
# --------------------------------------------------------------------------------------------------


def _layout_of(block: torch.nn.Module, layouts: Dict[type, Optional[_BlockLayout]]
               ) -> Optional[Tuple[type, Optional[_BlockLayout]]]:
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


def _site_for(block: torch.nn.Module, cls: type, layout: Optional[_BlockLayout], state: _FreeUState
              ) -> Optional[_Site]:
    """The call site of one up block, or None when no concat of it is affected under this placement."""
    if state.options.placement == "diffusers":
        fixed_stage = {0: 0, 1: 1}.get(getattr(block, "resolution_idx", None))
        if fixed_stage is None:
            return None
        stage_by_channels = None
    else:
        fixed_stage = None
        stage_by_channels = {channels: index for index, channels in enumerate(state.options.stage_channels)}
    parameters = [
        p for p in list(inspect.signature(cls.forward).parameters.values())[1:]
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    names = tuple(p.name for p in parameters if p.kind is not p.KEYWORD_ONLY)
    read = layout.arguments_read() if layout is not None else _CONTROLNET_XS_ARGUMENTS
    missing = read - {p.name for p in parameters}
    if missing:
        raise TypeError(
            f"model's up block {cls.__name__} has a forward without {sorted(missing)}: "
            "this diffusers version is not supported"
        )
    defaults = {p.name: (None if p.default is p.empty else p.default) for p in parameters}
    return _Site(layout, names, defaults, state, fixed_stage, stage_by_channels)


def _install(unet: torch.nn.Module, state: _FreeUState) -> None:
    layouts = _block_layouts()
    sites = []
    for block in unet.up_blocks:
        found = _layout_of(block, layouts)
        if found is None:
            if state.options.placement == "official":
                warnings.warn(f"FreeU: up block {type(block).__name__} is not supported; its concats stay plain")
            continue
        site = _site_for(block, *found, state)
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
        forward = _up_block_forward if site.layout is not None else _controlnet_xs_up_block_forward
        block.forward = types.MethodType(forward, block)
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


def _apply(unet: torch.nn.Module, pipeline, options: _Options, stages: Sequence[FreeUStage],
           schedule: Optional[FreeUSchedule]) -> None:
    state: Optional[_FreeUState] = getattr(unet, _STATE_ATTRIBUTE, None)
    if state is not None and state.options == options:
        # Same structure: only values change, so a compiled U-Net keeps its graph.
        state.set_stages(stages)
        state.use_schedule(schedule)
        state.pipeline = pipeline if pipeline is not None else state.pipeline
        return
    _uninstall(unet)
    _install(unet, _FreeUState(options, stages, schedule, pipeline, _module_device(unet)))


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def enable_freeu(
    model,
    *positional_factors,
    b1: Optional[float] = None,
    b2: Optional[float] = None,
    s1: Optional[float] = None,
    s2: Optional[float] = None,
    preset: Optional[str] = None,
    stages: Optional[Mapping[int, Union[FreeUStage, Mapping[str, Any]]]] = None,
    version: Optional[int] = None,
    placement: Optional[str] = None,
    backend: Optional[str] = None,
    threshold: Union[int, Tuple[int, int]] = 1,
    mask: str = "box",
    high_gain: float = 1.0,
    schedule: Union[FreeUSchedule, Tuple[float, float], None] = None,
) -> None:
    """Turn FreeU on in a diffusers U-Net (or a pipeline's ``.unet``), each affected concat fused into one op.

    Args:
        model: a pipeline with ``.unet`` or the U-Net: UNet2DConditionModel, UNet3DConditionModel,
            UNetMotionModel, I2VGenXLUNet or UNetControlNetXSModel (a ``torch.compile`` wrapper of one
            works too). Anything else raises TypeError naming its class.
        b1, b2: backbone factors of stages 1 and 2. s1, s2: skip factors (gain of the lowest frequencies).
            Keyword only: diffusers' ``enable_freeu(s1, s2, b1, b2)`` takes them in another order, so a
            positional call raises TypeError showing both keyword forms. Factors of 0 are applied as given.
        preset: a name from :data:`freeu_kernels.PRESETS` ("sd15", "sdxl", ..., "webui", "forge");
            explicit arguments override it (b1/s1 and b2/s2 name the stages at 4x and 2x the model channels).
        stages: any number of stages keyed by the backbone's channel count at a concat, each a
            :class:`FreeUStage` (or a mapping of its fields), instead of b1..s2; implies placement "official".
            A stage's unset fields take this call's version, threshold, mask and high_gain.
        version: 1 (scale the channel window by b) or 2 (by ``(b - 1) * m^ + 1``, the structure map);
            None: the preset's, else 1.
        placement: "diffusers" (stages on up blocks 0 and 1, like ``unet.enable_freeu``) or "official"
            (stage by the backbone's channel count at each concat, like the official code, ComfyUI, Forge
            and the A1111 extension); None: the preset's, "official" with stages, else "diffusers".
        backend: None/"auto", "torch", "cpu", "triton" or "cuda" (see :func:`freeu_kernels.fused_concat`);
            one that cannot run on the model's device raises ValueError now, and at the first call after
            the model moved to such a device.
        threshold, mask, high_gain: the skip filter's low-frequency region (an int or a ``(rows, cols)``
            box) and the gain outside it.
        schedule: a :class:`FreeUSchedule` or ``(start, stop)`` fractions (read with the preset's step rule,
            else "progress"); None means every step at full strength.

    Calling it again with the same structure (placement, backend, stage channels and every stage setting
    but the factors) only updates the factors and the schedule in place (a compiled U-Net does not
    recompile); other changes re-install. While it is on, diffusers' own ``unet.enable_freeu`` settings
    have no effect on the patched blocks.
    """
    _reject_positional_factors(positional_factors)
    unet, pipeline = _resolve_unet(model)
    preset_settings = lookup_preset(preset, "preset") if preset is not None else None
    if version is None:
        version = preset_settings.version if preset_settings is not None and preset_settings.version else 1
    version = check_version("version", version)
    threshold = check_threshold("threshold", threshold)
    mask = check_mask("mask", mask)
    high_gain = check_real("high_gain", high_gain)
    backend = _check_backend(backend)
    device = _module_device(unet)
    _check_backend_runs_on(backend, device)
    placement, stage_channels, resolved = _resolve_stages(
        unet, preset_settings, stages, {"b1": b1, "b2": b2, "s1": s1, "s2": s2}, placement, version, threshold,
        mask, high_gain,
    )
    rule = preset_settings.schedule_rule if preset_settings is not None and preset_settings.schedule_rule \
        else "progress"
    options = _Options(placement, stage_channels, tuple(stage.structure() for stage in resolved), backend)
    _apply(unet, pipeline, options, resolved, as_schedule(schedule, rule))


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
    previous stages, options and schedule are put back (in place when the options are the same).
    """
    unet, _ = _resolve_unet(model)
    previous: Optional[_FreeUState] = getattr(unet, _STATE_ATTRIBUTE, None)
    saved = None
    if previous is not None:
        saved = (previous.pipeline, previous.options, previous.stages, previous.schedule)
    enable_freeu(model, *args, **kwargs)
    try:
        yield model
    finally:
        if saved is None:
            _uninstall(unet)
        else:
            _apply(unet, *saved)
