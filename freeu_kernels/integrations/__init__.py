"""Framework integrations of FreeU, built on :func:`freeu_kernels.fused_concat`.

- :mod:`.stages`: the framework-neutral settings model: :class:`~.stages.FreeUStage` (one stage's factors,
  channel window, skip filter and version), :class:`~.stages.ChannelWindow` (the A1111 extension's
  offset/width channel region) and :class:`~.stages.FreeUSchedule` (which denoising steps run FreeU, with
  each peer's step rule and a smooth ramp, all held in tensors).
- :mod:`.presets`: the published factors and the defaults of the A1111 extension and of Forge.
- :mod:`.diffusers`: the drop-in for diffusers U-Nets (``enable_freeu``, ``disable_freeu``, ``freeu``);
  it imports diffusers only when a model is patched.

Layering: stages <- presets <- diffusers; none of them imports the package root.
"""
