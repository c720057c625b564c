"""The diffusers integration: tiny random U-Nets of every supported family (ControlNet-XS included), on CPU.

Oracles:
- placement="diffusers", version 1, non-zero factors: diffusers' own ``unet.enable_freeu``.
- everything else (placement="official", version 2, factors of 0): diffusers' own up-block forwards with
  diffusers' ``apply_freeu`` swapped for a few lines built on ``fused_concat_reference`` that pick the stage
  by the official rule (backbone channels) or by diffusers' rule (``resolution_idx``). That oracle shares
  no code with the integration's replacement forwards.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Callable, Dict

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers.models.controlnets import controlnet_xs  # noqa: E402
from diffusers.models.unets import unet_2d_blocks, unet_3d_blocks, unet_motion_model  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

import freeu_kernels  # noqa: E402
from freeu_kernels import FreeUSchedule, disable_freeu, enable_freeu, freeu, fused_concat_reference  # noqa: E402
from freeu_kernels.integrations.presets import PRESETS, get_preset  # noqa: E402

SD15 = dict(b1=1.5, b2=1.6, s1=0.9, s2=0.2)
# Tiny models, but float32 through a dozen layers: FFT (reference) and low-rank (op) filters differ by rounding.
TOLERANCE = dict(rtol=1e-4, atol=1e-5)
# Through a sampler: DDIM divides the noise prediction's rounding by sqrt(alpha_bar) at every step.
PIPELINE_TOLERANCE = dict(rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Tiny U-Nets shaped like the real ones: SD-like four levels with UpBlock2D first, SDXL-like three levels with
# text-time embeddings, ModelScope/ZeroScope UNet3D, AnimateDiff's motion U-Net and I2VGen-XL.
# ----------------------------------------------------------------------------------------------------------

FRAMES = 2
COMMON = dict(block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=16)


@dataclass
class TinyUNet:
    unet: torch.nn.Module
    inputs: Dict[str, torch.Tensor]  # every forward argument but the timestep

    def __call__(self, timestep=500):
        with torch.no_grad():
            return self.unet(timestep=torch.as_tensor(timestep), **self.inputs).sample


def _text(batch=2):
    return torch.randn(batch, 5, 16)


def _sd() -> TinyUNet:
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=16, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    return TinyUNet(unet, dict(sample=torch.randn(2, 4, 16, 16), encoder_hidden_states=_text()))


def _sdxl() -> TinyUNet:
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 1, 2),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,  # pooled text (16) + 6 time ids of 8 each
        use_linear_projection=True, **COMMON,
    )
    added = {"text_embeds": torch.randn(2, 16), "time_ids": torch.randn(2, 6)}
    inputs = dict(sample=torch.randn(2, 4, 16, 16), encoder_hidden_states=_text(), added_cond_kwargs=added)
    return TinyUNet(unet, inputs)


# ModelScope / ZeroScope and I2VGen-XL share the UNet3D block layout (UpBlock3D first, as in the real configs).
UNET3D_BLOCKS = dict(
    sample_size=16, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"), **COMMON,
)


def _video(batch=1):
    return torch.randn(batch, 4, FRAMES, 16, 16)


def _unet3d() -> TinyUNet:
    unet = diffusers.UNet3DConditionModel(**UNET3D_BLOCKS)
    return TinyUNet(unet, dict(sample=_video(), encoder_hidden_states=_text(1)))


def _motion() -> TinyUNet:
    unet = diffusers.UNetMotionModel(
        sample_size=16, num_attention_heads=2, motion_num_attention_heads=2, motion_max_seq_length=8,
        down_block_types=("CrossAttnDownBlockMotion", "CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion", "CrossAttnUpBlockMotion"), **COMMON,
    )
    # AnimateDiff pipelines give the motion U-Net one text embedding per frame.
    return TinyUNet(unet, dict(sample=_video(), encoder_hidden_states=_text(FRAMES)))


def _i2vgen() -> TinyUNet:
    unet = diffusers.I2VGenXLUNet(**UNET3D_BLOCKS)
    inputs = dict(
        sample=_video(), encoder_hidden_states=_text(1), fps=torch.tensor([8]),
        image_latents=_video(), image_embeddings=torch.randn(1, 16),
    )
    return TinyUNet(unet, inputs)


def _controlnet_xs() -> TinyUNet:
    # ControlNet-XS joins a base U-Net and a control adapter; its up blocks need two layers per block.
    base = diffusers.UNet2DConditionModel(
        sample_size=16, block_out_channels=(8, 16, 32), layers_per_block=2, norm_num_groups=4,
        cross_attention_dim=16, attention_head_dim=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )
    adapter = diffusers.ControlNetXSAdapter.from_unet(
        base, size_ratio=0.5, learn_time_embedding=True, conditioning_embedding_out_channels=(4,))
    unet = diffusers.UNetControlNetXSModel.from_unet(base, adapter)
    for name, parameter in unet.named_parameters():
        if "to_base" in name:  # zero-initialised connections: make the control branch reach the decoder
            torch.nn.init.normal_(parameter, std=0.1)
    inputs = dict(sample=torch.randn(1, 4, 16, 16), encoder_hidden_states=_text(1),
                  controlnet_cond=torch.randn(1, 3, 16, 16))
    return TinyUNet(unet, inputs)


BUILDERS: Dict[str, Callable[[], TinyUNet]] = {
    "sd": _sd, "sdxl": _sdxl, "unet3d": _unet3d, "motion": _motion, "i2vgen": _i2vgen,
    "controlnet_xs": _controlnet_xs,
}
_BUILT: Dict[str, TinyUNet] = {}


def _built(family: str) -> TinyUNet:
    """The tiny U-Net of one family, built once (same seed, same weights) and reused by every test."""
    if family not in _BUILT:
        torch.manual_seed(0)
        _BUILT[family] = BUILDERS[family]()
        _BUILT[family].unet.eval()
    return _BUILT[family]


def _lend(family: str):
    """Yield the shared model, then turn both FreeUs (this package's and diffusers') off again."""
    model = _built(family)
    yield model
    disable_freeu(model.unet)
    model.unet.disable_freeu()


@pytest.fixture(params=sorted(BUILDERS))
def tiny(request) -> TinyUNet:
    """Each family in turn."""
    yield from _lend(request.param)


@pytest.fixture
def sd() -> TinyUNet:
    """The SD-like U-Net, for tests that need one model only."""
    yield from _lend("sd")


# ----------------------------------------------------------------------------------------------------------
# The oracle for rules diffusers does not implement
# ----------------------------------------------------------------------------------------------------------


def run_with_concat_rewrite(model: TinyUNet, rewrite: Callable, timestep=500):
    """Run diffusers' own forwards with its ``apply_freeu`` replaced by ``rewrite(resolution_idx, hidden, skip)``.

    diffusers' up blocks call ``apply_freeu`` right before each skip concat (when FreeU is on) and concat
    what it returns: the rewrite sees every up-block concat, the hook every peer's FreeU patches.
    """
    modules = (unet_2d_blocks, unet_3d_blocks, unet_motion_model, controlnet_xs)
    originals = [module.apply_freeu for module in modules]

    def rewritten_apply_freeu(resolution_idx, hidden, skip, **_ignored):
        return rewrite(resolution_idx, hidden, skip)

    # Truthy placeholders: diffusers only calls apply_freeu when all four attributes are truthy.
    model.unet.enable_freeu(s1=1.0, s2=1.0, b1=1.0, b2=1.0)
    try:
        for module in modules:
            module.apply_freeu = rewritten_apply_freeu
        return model(timestep)
    finally:
        for module, original in zip(modules, originals):
            module.apply_freeu = original
        model.unet.disable_freeu()


def run_with_reference_rule(model: TinyUNet, rule: str, version: int, factors: Dict[str, float], timestep=500):
    """diffusers' own forwards with ``fused_concat_reference`` at the concats ``rule`` selects.

    rule "official": stage from the backbone's channel count (4 mc -> 1, 2 mc -> 2) at every concat;
    rule "diffusers": stage from the block's resolution_idx (0 -> 1, 1 -> 2).
    """
    model_channels = model.unet.config.block_out_channels[0]

    def reference(resolution_idx, hidden, skip):
        if rule == "official":
            stage = {4 * model_channels: 1, 2 * model_channels: 2}.get(hidden.shape[1])
        else:
            stage = {0: 1, 1: 2}.get(resolution_idx)
        if stage is None:
            return hidden, skip
        both = fused_concat_reference(hidden, skip, factors[f"b{stage}"], factors[f"s{stage}"], 1, version=version)
        return both[:, : hidden.shape[1]], both[:, hidden.shape[1]:]

    return run_with_concat_rewrite(model, reference, timestep)


# ----------------------------------------------------------------------------------------------------------
# Placement and version against the oracles, every family
# ----------------------------------------------------------------------------------------------------------


def test_diffusers_placement_matches_diffusers_enable_freeu(tiny):
    tiny.unet.enable_freeu(**SD15)
    expected = tiny()
    tiny.unet.disable_freeu()
    plain = tiny()
    enable_freeu(tiny.unet, **SD15)
    actual = tiny()
    torch.testing.assert_close(actual, expected, **TOLERANCE)
    assert not torch.allclose(actual, plain, rtol=1e-3, atol=1e-3), "FreeU had no effect: the test proves nothing"


@pytest.mark.parametrize("version", [1, 2])
def test_official_placement_matches_reference(tiny, version):
    expected = run_with_reference_rule(tiny, "official", version, SD15)
    enable_freeu(tiny.unet, **SD15, placement="official", version=version)
    torch.testing.assert_close(tiny(), expected, **TOLERANCE)


def test_official_placement_reaches_more_concats_than_diffusers(sd):
    enable_freeu(sd.unet, **SD15, placement="official")
    official = sd()
    enable_freeu(sd.unet, **SD15, placement="diffusers")
    assert not torch.allclose(official, sd(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("placement", ["diffusers", "official"])
@pytest.mark.parametrize(
    "factors",
    [dict(b1=0.0, b2=1.6, s1=0.9, s2=0.2), dict(b1=1.5, b2=1.6, s1=0.0, s2=0.0)],
    ids=["b1=0", "s=0"],
)
def test_zero_factors_are_honoured(sd, placement, factors):
    # diffusers' own enable_freeu silently does nothing when a factor is 0; this integration applies it.
    expected = run_with_reference_rule(sd, placement, 1, factors)
    enable_freeu(sd.unet, **factors, placement=placement)
    torch.testing.assert_close(sd(), expected, **TOLERANCE)


def test_version_2_with_diffusers_placement(sd):
    expected = run_with_reference_rule(sd, "diffusers", 2, SD15)
    enable_freeu(sd.unet, **SD15, version=2)
    torch.testing.assert_close(sd(), expected, **TOLERANCE)


# ----------------------------------------------------------------------------------------------------------
# Disable, context manager, in-place updates, what is patched
# ----------------------------------------------------------------------------------------------------------


def test_disable_restores_bit_identical_outputs(tiny):
    before = tiny()
    enable_freeu(tiny.unet, **SD15, placement="official", version=2)
    tiny()
    disable_freeu(tiny.unet)
    assert torch.equal(tiny(), before)
    assert all("forward" not in vars(block) for block in tiny.unet.up_blocks)


def test_each_affected_concat_is_one_fused_op(sd, monkeypatch):
    calls = []
    from freeu_kernels.integrations import stages

    real = stages.fused_concat

    def counting_fused_concat(x, h, *args, **kwargs):
        calls.append(x.shape[1])
        return real(x, h, *args, **kwargs)

    monkeypatch.setattr(stages, "fused_concat", counting_fused_concat)
    enable_freeu(sd.unet, **SD15)
    sd()
    # diffusers placement: up blocks 0 and 1 (two concats each, layers_per_block + 1), backbone 64 channels.
    assert calls == [64, 64, 64, 64]
    calls.clear()
    enable_freeu(sd.unet, **SD15, placement="official")
    sd()
    # official: every concat whose backbone has 4 * 16 or 2 * 16 channels, in every up block (outputs 64, 64,
    # 32, 16 channels; each block's first concat sees the previous block's output).
    assert calls == [64, 64, 64, 64, 64, 32, 32]


def test_neutral_factors_are_a_plain_concat(sd):
    before = sd()
    enable_freeu(sd.unet, b1=1, b2=1, s1=1, s2=1, placement="official")
    assert torch.equal(sd(), before)


def test_context_manager_enables_then_restores(sd):
    plain = sd()
    with freeu(sd.unet, **SD15):
        inside = sd()
    assert torch.equal(sd(), plain)
    enable_freeu(sd.unet, preset="sd14")
    sd14 = sd()
    with freeu(sd.unet, **SD15):
        assert torch.equal(sd(), inside)
    assert torch.equal(sd(), sd14), "the previous FreeU settings must come back"


def test_enabling_again_updates_factors_in_place(sd):
    enable_freeu(sd.unet, **SD15)
    state = sd.unet._freeu_kernels_state
    b1 = state.factor_tensors[0][0]
    enable_freeu(sd.unet, b1=1.1, b2=1.2, s1=0.5, s2=0.5)
    assert sd.unet._freeu_kernels_state is state and state.factor_tensors[0][0] is b1
    assert float(b1) == pytest.approx(1.1)
    enable_freeu(sd.unet, **SD15, version=2)
    assert sd.unet._freeu_kernels_state is not state, "new options re-install"


def test_enabled_under_inference_mode_then_updated_and_differentiated_outside(sd):
    """Scripts enable FreeU inside torch.inference_mode(); the factor tensors must still take an in-place
    update and be saved for backward once outside it."""
    with torch.inference_mode():
        enable_freeu(sd.unet, **SD15)
    enable_freeu(sd.unet, b1=1.1, b2=1.2, s1=0.5, s2=0.5)  # in place (same options)
    assert float(sd.unet._freeu_kernels_state.factor_tensors[0][0]) == pytest.approx(1.1)
    sample = sd.inputs["sample"].clone().requires_grad_(True)
    inputs = dict(sd.inputs, sample=sample)
    sd.unet(timestep=torch.tensor(500), **inputs).sample.square().sum().backward()
    assert sample.grad is not None and sample.grad.abs().sum() > 0


def test_gradients_match_diffusers_under_gradient_checkpointing(sd, monkeypatch):
    checkpointed = []
    sd.unet.enable_gradient_checkpointing()

    def grad_of_sample():
        sample = sd.inputs["sample"].clone().requires_grad_(True)
        sd.unet(sample, torch.tensor(500), sd.inputs["encoder_hidden_states"]).sample.square().mean().backward()
        return sample.grad

    try:
        sd.unet.enable_freeu(**SD15)
        expected = grad_of_sample()
        sd.unet.disable_freeu()
        enable_freeu(sd.unet, **SD15)
        block = sd.unet.up_blocks[0]
        real = block._gradient_checkpointing_func
        monkeypatch.setattr(block, "_gradient_checkpointing_func", lambda *a: checkpointed.append(1) or real(*a))
        actual = grad_of_sample()
    finally:
        sd.unet.disable_gradient_checkpointing()
    assert checkpointed, "the replacement forward must keep diffusers' gradient checkpointing"
    torch.testing.assert_close(actual, expected, **TOLERANCE)


# ----------------------------------------------------------------------------------------------------------
# Schedule (U-Net level: progress from the timestep fraction)
# ----------------------------------------------------------------------------------------------------------


def test_schedule_switches_by_denoising_progress(sd):
    plain_late, plain_early = sd(100), sd(900)
    enable_freeu(sd.unet, **SD15)
    on_early = sd(900)
    # Without a pipeline, progress = (999 - t) / 1000: t = 900 -> 0.099, t = 100 -> 0.899.
    schedule = FreeUSchedule(stop=0.6)
    enable_freeu(sd.unet, **SD15, schedule=schedule)
    assert torch.equal(sd(900), on_early)
    assert torch.equal(sd(100), plain_late), "outside the window FreeU must be exactly off"
    schedule.set(start=0.5, stop=1.0)
    assert torch.equal(sd(900), plain_early)
    assert not torch.equal(sd(100), plain_late)


def test_schedule_validation(sd):
    with pytest.raises(ValueError, match="stop"):
        FreeUSchedule(stop=1.5)
    with pytest.raises(ValueError, match="start"):
        FreeUSchedule(start=0.7, stop=0.6)
    with pytest.raises(TypeError, match="schedule"):
        enable_freeu(sd.unet, **SD15, schedule="first half")


def test_progress_from_a_timestep_table():
    from freeu_kernels.integrations.stages import denoising_progress

    table = torch.tensor([999, 749, 499, 249])
    assert [float(denoising_progress(t, table)) for t in table] == [0.0, 0.25, 0.5, 0.75]


# ----------------------------------------------------------------------------------------------------------
# torch.compile: one graph, no break, no recompilation when factors or the schedule change
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    """A clean compile cache before and after, whatever the test's outcome."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_fullgraph_without_recompiling(sd, fresh_dynamo):
    eager = {}
    schedule = FreeUSchedule(stop=0.6)
    settings = [
        (SD15, (0.0, 0.6), 900),
        (dict(b1=1.1, b2=1.2, s1=0.5, s2=0.7), (0.0, 0.6), 900),  # new factors
        (dict(b1=1.1, b2=1.2, s1=0.5, s2=0.7), (0.0, 0.6), 100),  # new timestep: schedule turns FreeU off
        (SD15, (0.5, 1.0), 100),  # new schedule window
    ]
    for index, (factors, window, timestep) in enumerate(settings):
        enable_freeu(sd.unet, **factors, placement="official", version=2, schedule=schedule.set(*window))
        eager[index] = sd(timestep)

    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(sd.unet, backend=counter, fullgraph=True)
    for index, (factors, window, timestep) in enumerate(settings):
        enable_freeu(sd.unet, **factors, placement="official", version=2, schedule=schedule.set(*window))
        with torch.no_grad():
            out = compiled(timestep=torch.tensor(timestep), **sd.inputs).sample
        torch.testing.assert_close(out, eager[index], rtol=1e-5, atol=1e-6)
        if index == 0:
            frames_after_first_call = counter.frame_count
            assert frames_after_first_call >= 1
    assert counter.frame_count == frames_after_first_call, "changing factors or the schedule recompiled"


# ----------------------------------------------------------------------------------------------------------
# Presets and argument errors
# ----------------------------------------------------------------------------------------------------------


def test_presets_hold_the_published_factors():
    assert get_preset("SD1.5").as_kwargs() == SD15
    assert get_preset("sd-1.4").as_kwargs() == dict(b1=1.3, b2=1.4, s1=0.9, s2=0.2)
    assert get_preset("sd21").as_kwargs() == dict(b1=1.4, b2=1.6, s1=0.9, s2=0.2)
    assert get_preset("SDXL").as_kwargs() == dict(b1=1.3, b2=1.4, s1=0.9, s2=0.2)
    for video in ("zeroscope", "modelscope"):
        assert get_preset(video).as_kwargs() == dict(b1=1.2, b2=1.4, s1=0.9, s2=0.2)
    assert set(PRESETS) == {"sd14", "sd15", "sd21", "sdxl", "zeroscope", "modelscope", "webui", "forge"}
    assert freeu_kernels.PRESETS is PRESETS
    with pytest.raises(ValueError, match="name"):
        get_preset("sd3")
    with pytest.raises(Exception):
        get_preset("sdxl").b1 = 2.0  # frozen


def test_preset_argument_equals_explicit_factors(sd):
    enable_freeu(sd.unet, preset="sdxl")
    by_name = sd()
    enable_freeu(sd.unet, **get_preset("sdxl").as_kwargs())
    assert torch.equal(sd(), by_name)
    enable_freeu(sd.unet, preset="sdxl", b1=1.0)  # explicit factors override the preset's
    assert sd.unet._freeu_kernels_state.factor_values() == pytest.approx(dict(b1=1.0, b2=1.4, s1=0.9, s2=0.2))


def test_argument_errors(sd):
    with pytest.raises(TypeError, match="Linear"):
        enable_freeu(torch.nn.Linear(2, 2), **SD15)
    with pytest.raises(TypeError, match="UNet2DModel"):
        unconditional = diffusers.UNet2DModel(
            block_out_channels=(8, 8), norm_num_groups=4,
            down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
        )
        enable_freeu(unconditional, **SD15)
    with pytest.raises(ValueError, match="placement"):
        enable_freeu(sd.unet, **SD15, placement="comfy")
    with pytest.raises(ValueError, match="version"):
        enable_freeu(sd.unet, **SD15, version=3)
    with pytest.raises(ValueError, match="backend"):
        enable_freeu(sd.unet, **SD15, backend="metal")
    with pytest.raises(TypeError, match=r"\['s2'\]"):
        enable_freeu(sd.unet, b1=1.5, b2=1.6, s1=0.9)
    with pytest.raises(TypeError, match="b1"):
        enable_freeu(sd.unet, b1="1.5", b2=1.6, s1=0.9, s2=0.2)
    assert not hasattr(sd.unet, "_freeu_kernels_state"), "a rejected call must leave the model untouched"


def test_factors_are_keyword_only_and_the_error_shows_the_keyword_forms(sd):
    # diffusers' pipe.enable_freeu(s1, s2, b1, b2) ported positionally would swap the factors: refused.
    with pytest.raises(TypeError, match=r"keyword only") as error:
        enable_freeu(sd.unet, 0.9, 0.2, 1.2, 1.4)
    message = str(error.value)
    assert "enable_freeu(model, s1=0.9, s2=0.2, b1=1.2, b2=1.4)" in message
    assert "enable_freeu(model, b1=0.9, b2=0.2, s1=1.2, s2=1.4)" in message
    with pytest.raises(TypeError, match=r"keyword only"):
        enable_freeu(sd.unet, 1.5)
    assert not hasattr(sd.unet, "_freeu_kernels_state")


def test_preset_errors_name_the_argument(sd):
    with pytest.raises(ValueError, match=r"^preset must be one of .*'webui'.*got 'sd3'"):
        enable_freeu(sd.unet, preset="sd3")
    with pytest.raises(TypeError, match=r"^preset must be a str"):
        enable_freeu(sd.unet, preset=15)


def test_backend_is_checked_against_the_models_device(sd):
    with pytest.raises(ValueError, match=r"backend='cuda' cannot run .*the model is on cpu"):
        enable_freeu(sd.unet, **SD15, backend="cuda")
    assert not hasattr(sd.unet, "_freeu_kernels_state")


@pytest.mark.skipif("cpu" not in freeu_kernels.available_backends("cpu"), reason="CPU kernel library not built")
def test_backend_is_checked_again_after_the_model_moved():
    model = _sd()
    enable_freeu(model.unet, **SD15, backend="cpu")
    model.unet.to("meta")  # a device the cpu backend cannot run on (and that needs no accelerator)
    inputs = {name: value.to("meta") for name, value in model.inputs.items()}
    with pytest.raises(ValueError, match=r"backend='cpu' cannot run .*now runs on meta \(it moved"):
        model.unet(timestep=torch.tensor(500), **inputs)


def test_stage_argument_errors(sd):
    stage = freeu_kernels.FreeUStage(1.2, 0.9)
    with pytest.raises(ValueError, match="placement"):
        enable_freeu(sd.unet, stages={64: stage}, placement="diffusers")
    with pytest.raises(TypeError, match="stages= or the factors"):
        enable_freeu(sd.unet, stages={64: stage}, b1=1.2)
    with pytest.raises(ValueError, match="stages keys"):
        enable_freeu(sd.unet, stages={"4x": stage})
    with pytest.raises(ValueError, match="cutoff"):
        enable_freeu(sd.unet, stages={64: dict(backbone_factor=1.2, skip_factor=0.9, cutoff=0.5)}, mask="radial")
    with pytest.raises(ValueError, match="threshold"):
        enable_freeu(sd.unet, **SD15, threshold=(2, 1), mask="radial")
    with pytest.raises(TypeError, match="channels"):
        freeu_kernels.FreeUStage(1.2, 0.9, channels="first half")
    with pytest.raises(ValueError, match="backbone_factor"):
        freeu_kernels.FreeUStage(float("nan"), 0.9)
    assert not hasattr(sd.unet, "_freeu_kernels_state")


def test_presets_of_peers_set_their_version_placement_and_rule(sd):
    enable_freeu(sd.unet, preset="forge", schedule=(0.25, 1.0))
    state = sd.unet._freeu_kernels_state
    assert state.options.placement == "official" and {stage.version for stage in state.stages} == {2}
    assert state.schedule.rule == "forge"
    enable_freeu(sd.unet, preset="webui", b1=1.3)  # b1 names the stage at 4x the model channels
    state = sd.unet._freeu_kernels_state
    assert state.options.stage_channels == (64, 32, 16) and state.stages[0].backbone_factor == 1.3
    enable_freeu(sd.unet, preset="webui", version=1)  # explicit arguments override the preset
    assert {stage.version for stage in sd.unet._freeu_kernels_state.stages} == {1}


def test_compiled_stages_with_a_smooth_schedule_do_not_recompile(sd, fresh_dynamo):
    model_channels = sd.unet.config.block_out_channels[0]
    stages = {
        4 * model_channels: freeu_kernels.FreeUStage(
            1.3, 0.7, channels=freeu_kernels.ChannelWindow(0.8, 0.5), cutoff=0.6, high_gain=1.2),
        2 * model_channels: freeu_kernels.FreeUStage(1.1, 0.4, channels=[(0, 3), (20, 32)], threshold=(2, 1)),
        model_channels: freeu_kernels.FreeUStage(0.9, 1.1, version=1),
    }
    schedule = FreeUSchedule(0.2, 0.7, rule="webui", smoothness=0.5)
    # New factors, a new window and smoothness, a new step: none of them recompiles.
    settings = [((0.2, 0.7, 0.5), 1.3, 850), ((0.0, 0.8, 0.0), 1.5, 400)]

    def configure(window, b):
        schedule.set(*window)
        stages[4 * model_channels] = dataclasses.replace(stages[4 * model_channels], backbone_factor=b)
        enable_freeu(sd.unet, stages=stages, version=2, schedule=schedule)

    eager = []
    for window, b, timestep in settings:
        configure(window, b)
        eager.append(sd(timestep))
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(sd.unet, backend=counter, fullgraph=True)
    for index, (window, b, timestep) in enumerate(settings):
        configure(window, b)
        with torch.no_grad():
            out = compiled(timestep=torch.tensor(timestep), **sd.inputs).sample
        torch.testing.assert_close(out, eager[index], rtol=1e-5, atol=1e-6)
        frames = counter.frame_count if index == 0 else frames
    assert counter.frame_count == frames, "changing factors or the schedule recompiled"


# ----------------------------------------------------------------------------------------------------------
# A whole StableDiffusionPipeline, built offline from tiny random components
# ----------------------------------------------------------------------------------------------------------


def _tiny_tokenizer(directory):
    from transformers import CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in letters + [letter + "</w>" for letter in letters]:
        vocab[token] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=16)


def tiny_pipeline(tokenizer_directory):
    """A StableDiffusionPipeline of random tiny components: no network, no hub."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = _tiny_tokenizer(tokenizer_directory)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 8), norm_num_groups=4, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    pipeline = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=_sd().unet,
        scheduler=diffusers.DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("tokenizer"))


def generate(pipeline, num_inference_steps=2, **kwargs):
    return pipeline(
        "a cat", num_inference_steps=num_inference_steps, height=32, width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="latent", **kwargs,
    ).images


def test_pipeline_enable_disable_context_and_schedule(pipe):
    plain = generate(pipe)

    pipe.enable_freeu(**SD15)  # diffusers' own FreeU, the reference
    native = generate(pipe)

    def native_freeu_off_after_first_step(pipeline, step, timestep, callback_kwargs):
        pipeline.disable_freeu()
        return callback_kwargs

    native_first_half = generate(pipe, callback_on_step_end=native_freeu_off_after_first_step)
    pipe.disable_freeu()

    enable_freeu(pipe, preset="sd15")
    torch.testing.assert_close(generate(pipe), native, **PIPELINE_TOLERANCE)
    disable_freeu(pipe)
    assert torch.equal(generate(pipe), plain)

    with freeu(pipe, preset="sd15"):
        torch.testing.assert_close(generate(pipe), native, **PIPELINE_TOLERANCE)
    assert torch.equal(generate(pipe), plain)

    # A plain call: the schedule reads the pipeline scheduler's timesteps [501, 1], so progress is 0 then 0.5
    # and stop=0.4 keeps step 0 only. (Timestep fractions, 0.498 and 0.998, would turn both steps off.)
    enable_freeu(pipe, preset="sd15", schedule=FreeUSchedule(stop=0.4))
    torch.testing.assert_close(generate(pipe), native_first_half, **PIPELINE_TOLERANCE)
    assert not torch.allclose(native_first_half, native, rtol=1e-4, atol=1e-5)
    disable_freeu(pipe)

    image = pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_pipeline_with_compiled_unet_follows_the_schedule_without_recompiling(tmp_path, fresh_dynamo):
    # unet.compile() traces the forward pre-hooks into the graph too: the schedule's tensor-only logic,
    # including the read of pipeline.scheduler.timesteps, must not break a fullgraph compile.
    pipeline = tiny_pipeline(tmp_path)
    schedule = FreeUSchedule(stop=0.4)
    enable_freeu(pipeline, preset="sd15", schedule=schedule)
    first_step_only = generate(pipeline)
    schedule.set(stop=1.0)
    every_step = generate(pipeline)

    counter = CompileCounterWithBackend("eager")
    pipeline.unet.compile(backend=counter, fullgraph=True)
    schedule.set(stop=0.4)
    torch.testing.assert_close(generate(pipeline), first_step_only, rtol=1e-5, atol=1e-6)
    frames = counter.frame_count
    schedule.set(stop=1.0)
    enable_freeu(pipeline, preset="sd14", schedule=schedule)  # new factors, same options: values only
    enable_freeu(pipeline, preset="sd15", schedule=schedule)
    torch.testing.assert_close(generate(pipeline), every_step, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == frames
