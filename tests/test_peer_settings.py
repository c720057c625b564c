"""Every setting of the A1111 extension, Forge and ComfyUI against a re-implementation of what they compute.

The oracles are in tests/peers.py (written from the peers' semantics, in this suite's own code). Levels:
- the pieces: the extension's channel region, the three step rules and the smooth ramp, exactly;
- one concat on random tensors (odd, non-square planes, Cx != Ch): FreeUStage.concat against the peers;
- tiny U-Nets of every family: enable_freeu with each peer's defaults (and a non-default extension
  setting with a smooth schedule) against diffusers' own forwards with the peer's FreeU at each concat;
- a tiny pipeline: each step rule selects the steps the peer selects.
"""

from __future__ import annotations

import itertools
from typing import Dict

import pytest
import torch

import peers
from freeu_kernels import ChannelWindow, FreeUSchedule, FreeUStage

TOLERANCE = dict(rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# The extension's channel region
# ----------------------------------------------------------------------------------------------------------

OFFSETS = (-1.3, -0.25, 0.0, 0.1, 0.25, 0.3, 0.5, 0.75, 0.9, 0.999, 1.0, 1.25)
WIDTHS = (-0.6, -0.25, 0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5)


@pytest.mark.parametrize("channels", [5, 8, 9, 16, 320])
def test_channel_window_selects_the_extensions_channels(channels):
    for offset, width in itertools.product(OFFSETS, WIDTHS):
        ranges = ChannelWindow(offset, width).ranges(channels)
        ours = [c for start, stop in ranges for c in range(start, stop)]
        assert ours == peers.webui_scaled_channels(channels, offset, width), (offset, width)
        assert len(ranges) <= 2 and all(start < stop for start, stop in ranges)


def test_channel_window_facts_stated_in_the_docs():
    assert ChannelWindow().ranges(320) == ((0, 161),)  # width 0.5: C / 2 + 1 channels, both ends included
    assert ChannelWindow(0.3, 0.0).ranges(10) == ((3, 4),)  # width 0: one channel
    assert ChannelWindow(0.75, 0.5).ranges(8) == ((0, 2), (7, 8))  # wraps: the complement of 2..6
    assert ChannelWindow(0.0, 1.0).ranges(8) == ((0, 8),)


# ----------------------------------------------------------------------------------------------------------
# Step rules and the smooth ramp, exactly
# ----------------------------------------------------------------------------------------------------------

FRACTIONS = (0.0, 0.1, 0.25, 0.3, 0.5, 0.7, 1.0)
WINDOWS = [(a, b) for a in FRACTIONS for b in FRACTIONS if a <= b]


def _strengths(schedule: FreeUSchedule, steps: int):
    return [float(schedule.strength(torch.tensor(float(i), dtype=torch.float64), steps)) for i in range(steps)]


@pytest.mark.parametrize("smoothness", [0.0, 0.35, 1.0])
def test_webui_rule_and_smoothness_match_the_extension(smoothness):
    for steps in (1, 2, 3, 5, 10, 30):
        for start, stop in WINDOWS:
            schedule = FreeUSchedule(start, stop, rule="webui", smoothness=smoothness)
            expected = [peers.webui_strength(i, steps, start, stop, smoothness) for i in range(steps)]
            assert _strengths(schedule, steps) == pytest.approx(expected, abs=1e-12), (steps, start, stop)


def test_forge_and_progress_rules_match_their_definitions():
    for steps in (2, 3, 5, 10, 30):
        for start, stop in WINDOWS:
            forge = [float(peers.forge_on(i, steps, start, stop)) for i in range(steps)]
            assert _strengths(FreeUSchedule(start, stop, rule="forge"), steps) == forge, (steps, start, stop)
            ours = [float(start <= i / steps < stop) for i in range(steps)]
            assert _strengths(FreeUSchedule(start, stop), steps) == ours, (steps, start, stop)
    # Forge divides by N - 1: with one step it fails; here the only step sits at position 0.
    assert _strengths(FreeUSchedule(0.0, 0.5, rule="forge"), 1) == [1.0]


def test_the_same_fractions_select_different_steps_per_rule():
    on = {rule: [i for i, r in enumerate(_strengths(FreeUSchedule(0.25, 1.0, rule=rule), 5)) if r]
          for rule in ("progress", "forge", "webui")}
    assert on == {"progress": [2, 3, 4], "forge": [1, 2, 3, 4], "webui": [1, 2, 3, 4]}


def test_schedule_set_changes_numbers_in_place_and_checks_them():
    schedule = FreeUSchedule(rule="webui")
    values = schedule.values
    schedule.set(start=0.2, smoothness=0.5)
    assert schedule.values is values and (schedule.start, schedule.stop, schedule.smoothness) == (0.2, 1.0, 0.5)
    with pytest.raises(ValueError, match="smoothness"):
        schedule.set(smoothness=1.5)
    with pytest.raises(ValueError, match="rule"):
        FreeUSchedule(rule="a1111")


# ----------------------------------------------------------------------------------------------------------
# One concat on random tensors: every extension setting
# ----------------------------------------------------------------------------------------------------------

# (x shape, skip channels): odd and non-square planes, Cx != Ch, odd Cx.
SHAPES = [((2, 9, 12, 9), 5), ((1, 8, 7, 10), 11)]
WEBUI_CASES = {
    "defaults": peers.WebuiStage(1.2, 0.9),
    "width 0": peers.WebuiStage(1.3, 0.7, backbone_offset=0.3, backbone_width=0.0),
    "wrapped": peers.WebuiStage(1.3, 0.7, backbone_offset=0.75, backbone_width=0.5),
    "negative width": peers.WebuiStage(0.8, 0.6, backbone_offset=0.2, backbone_width=-0.45),
    "full width": peers.WebuiStage(1.1, 0.5, backbone_width=1.0),
    "cutoff": peers.WebuiStage(1.2, 0.4, skip_cutoff=0.7),
    "high end": peers.WebuiStage(1.2, 0.8, skip_cutoff=0.35, skip_high_end_factor=1.3),
    "skip only": peers.WebuiStage(1.0, 0.5, skip_high_end_factor=0.0, skip_cutoff=1.0),
}


def ours_from_webui(stage: peers.WebuiStage, version: int) -> FreeUStage:
    """The README's mapping: an extension stage as a FreeUStage."""
    return FreeUStage(
        stage.backbone_factor, stage.skip_factor,
        channels=ChannelWindow(stage.backbone_offset, stage.backbone_width),
        cutoff=stage.skip_cutoff, high_gain=stage.skip_high_end_factor, version=version,
    )


@pytest.mark.parametrize("case", sorted(WEBUI_CASES))
@pytest.mark.parametrize("version", [1, 2])
def test_stage_concat_matches_the_extension(case, version):
    stage = WEBUI_CASES[case]
    ours = ours_from_webui(stage, version)
    generator = torch.Generator().manual_seed(0)
    for shape, skip_channels in SHAPES:
        x = torch.randn(shape, generator=generator)
        h = torch.randn((shape[0], skip_channels) + shape[2:], generator=generator)
        expected = torch.cat(peers.webui_concat(x, h, stage, version), dim=1)
        torch.testing.assert_close(ours.concat(x, h), expected, **TOLERANCE)
        # A schedule's partial strength: factors ramped as 0-d tensors, the high gain through linearity.
        strength = torch.tensor(0.4)
        ramp = lambda f: torch.lerp(torch.tensor(1.0), torch.tensor(f), strength)  # noqa: E731
        partial = ours.concat(x, h, backbone_factor=ramp(stage.backbone_factor), skip_factor=ramp(stage.skip_factor),
                              high_gain=ramp(stage.skip_high_end_factor))
        expected = torch.cat(peers.webui_concat(x, h, stage, version, strength=0.4), dim=1)
        torch.testing.assert_close(partial, expected, **TOLERANCE)


def test_cutoff_is_a_rectangular_box_on_non_square_planes():
    stage = FreeUStage(1.0, 0.5, cutoff=0.7)
    assert stage.threshold_for(12, 9) == (4, 2)  # floor(6 * 0.7), floor(4 * 0.7)
    assert stage.threshold_for(7, 10) == (2, 3)
    assert FreeUStage(1.0, 0.5, cutoff=0.0).threshold_for(64, 48) == 1  # at least one frequency per axis


# ----------------------------------------------------------------------------------------------------------
# Tiny U-Nets of every family: each peer's defaults end to end, and a non-default extension setting
# ----------------------------------------------------------------------------------------------------------

diffusers = pytest.importorskip("diffusers")

from test_diffusers_integration import BUILDERS, _lend, run_with_concat_rewrite  # noqa: E402

from freeu_kernels import disable_freeu, enable_freeu  # noqa: E402


@pytest.fixture(params=sorted(BUILDERS))
def tiny(request):
    """Each family's tiny U-Net in turn (shared with test_diffusers_integration, reset after use)."""
    yield from _lend(request.param)


def run_webui(model, settings: peers.WebuiSettings, timestep: int):
    """The extension at every up-block concat; its step counter i = 999 - t of N = 1000 (no sampler)."""
    model_channels = model.unet.config.block_out_channels[0]
    strength = peers.webui_strength(999 - timestep, 1000, settings.start, settings.stop, settings.smoothness)

    def rewrite(_resolution_idx, hidden, skip):
        stage = peers.webui_stage_of(hidden.shape[1], model_channels, settings)
        return (hidden, skip) if stage is None else peers.webui_concat(hidden, skip, stage, settings.version, strength)

    return run_with_concat_rewrite(model, rewrite, timestep)


def run_official(model, factors: Dict[str, float], version: int):
    model_channels = model.unet.config.block_out_channels[0]
    return run_with_concat_rewrite(
        model, lambda _idx, hidden, skip: peers.official_concat(hidden, skip, model_channels, factors, version))


def test_webui_preset_is_the_extensions_defaults(tiny):
    expected = run_webui(tiny, peers.WebuiSettings(), timestep=500)
    plain = tiny()
    enable_freeu(tiny.unet, preset="webui")
    actual = tiny()
    torch.testing.assert_close(actual, expected, **TOLERANCE)
    assert not torch.allclose(actual, plain, rtol=1e-3, atol=1e-3), "FreeU had no effect: the test proves nothing"


def test_webui_settings_with_a_smooth_schedule(tiny):
    settings = peers.WebuiSettings(
        stages=[
            peers.WebuiStage(1.3, 0.7, backbone_offset=0.8, backbone_width=0.5, skip_cutoff=0.6,
                             skip_high_end_factor=1.2),
            peers.WebuiStage(1.1, 0.4, backbone_offset=0.0, backbone_width=0.0, skip_cutoff=0.3,
                             skip_high_end_factor=0.9),
            peers.WebuiStage(0.9, 1.1, backbone_offset=0.25, backbone_width=-0.2),
        ],
        version=1, start=0.2, stop=0.7, smoothness=0.5,
    )
    model_channels = tiny.unet.config.block_out_channels[0]
    stages = {
        multiple * model_channels: ours_from_webui(stage, settings.version)
        for multiple, stage in zip((4, 2, 1), settings.stages)
    }
    schedule = FreeUSchedule(settings.start, settings.stop, rule="webui", smoothness=settings.smoothness)
    enable_freeu(tiny.unet, stages=stages, schedule=schedule)
    # t = 850: step 149 of 1000, before the start step 200: on the ramp (strength 0.5 * 149 / 200).
    for timestep in (850, 400):
        ours = tiny(timestep)
        disable_freeu(tiny.unet)
        torch.testing.assert_close(ours, run_webui(tiny, settings, timestep), **TOLERANCE)
        enable_freeu(tiny.unet, stages=stages, schedule=schedule)


def test_forge_preset_is_forges_defaults(tiny):
    factors = {name: peers.FORGE_DEFAULTS[name] for name in ("b1", "b2", "s1", "s2")}
    expected = run_official(tiny, factors, version=2)
    enable_freeu(tiny.unet, preset="forge")
    torch.testing.assert_close(tiny(), expected, **TOLERANCE)


@pytest.mark.parametrize("version", [1, 2])
def test_comfyui_nodes_defaults(tiny, version):
    factors = peers.COMFY_FREEU_DEFAULTS if version == 1 else peers.COMFY_FREEU_V2_DEFAULTS
    expected = run_official(tiny, factors, version)
    enable_freeu(tiny.unet, **factors, placement="official", version=version)
    torch.testing.assert_close(tiny(), expected, **TOLERANCE)


# ----------------------------------------------------------------------------------------------------------
# A pipeline run: each rule turns FreeU on at the steps its peer does
# ----------------------------------------------------------------------------------------------------------

SD15 = dict(b1=1.5, b2=1.6, s1=0.9, s2=0.2)
PEER_STEPS = {
    "progress": lambda i, n, start, stop: start <= i / n < stop,
    "forge": peers.forge_on,
    "webui": lambda i, n, start, stop: peers.webui_strength(i, n, start, stop, 0.0) == 1.0,
}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from test_diffusers_integration import tiny_pipeline

    return tiny_pipeline(tmp_path_factory.mktemp("tokenizer"))


@pytest.mark.parametrize("rule", sorted(PEER_STEPS))
def test_pipeline_steps_follow_each_rule(pipe, rule):
    from test_diffusers_integration import PIPELINE_TOLERANCE, generate

    steps, start, stop = 5, 0.25, 0.75
    on = [PEER_STEPS[rule](i, steps, start, stop) for i in range(steps)]
    # The three rules disagree on these fractions, so a wrong rule gives other images.
    assert [i for i in range(steps) if on[i]] == {"progress": [2, 3], "forge": [1, 2, 3], "webui": [1, 2]}[rule]

    def switch(pipeline, step, _timestep, callback_kwargs):
        # Called after step `step`: set diffusers' own FreeU for the next one.
        if step + 1 < steps and on[step + 1]:
            pipeline.enable_freeu(**{k: SD15[k] for k in ("s1", "s2", "b1", "b2")})
        else:
            pipeline.disable_freeu()
        return callback_kwargs

    if on[0]:
        pipe.enable_freeu(**SD15)
    expected = generate(pipe, num_inference_steps=steps, callback_on_step_end=switch)
    pipe.disable_freeu()
    enable_freeu(pipe, **SD15, schedule=FreeUSchedule(start, stop, rule=rule))
    try:
        torch.testing.assert_close(generate(pipe, num_inference_steps=steps), expected, **PIPELINE_TOLERANCE)
    finally:
        disable_freeu(pipe)
