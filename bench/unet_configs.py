"""The U-Net configurations the benchmarks use: the published SD 1.5, SD 2.1 and SDXL base configs.

The dicts below are the ``unet/config.json`` of the public checkpoints (runwayml/stable-diffusion-v1-5,
stabilityai/stable-diffusion-2-1, stabilityai/stable-diffusion-xl-base-1.0), written out by hand because
this harness never touches the network; keys left at diffusers' defaults are omitted. Weights are random:
a U-Net step costs the same whatever the weights hold.

bench/cases.py derives the decoder's concat shapes from these same dicts, so the op-level cases and the
U-Net-level runs describe one model each.

``reduced_config`` shrinks a config for the CPU (channels / 10, small text width, 32-pixel latents)
while keeping its block structure, so FreeU still meets the same concats in the same places; results
from it are labelled "reduced" everywhere.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

__all__ = [
    "SD15_UNET",
    "SD21_UNET",
    "SDXL_UNET",
    "UNetModel",
    "MODELS",
    "reduced_config",
    "unet_inputs",
]

# Keys the three published configs share (diffusers' defaults written out, as the config files do).
_COMMON: Dict = {
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
}

SD15_UNET: Dict = {
    **_COMMON,
    "sample_size": 64,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
}

# SD 2.1 (768-v): the SD 1.5 layout with per-block head counts, OpenCLIP-H text (1024 wide), linear
# projections in the transformers and attention upcast to float32.
SD21_UNET: Dict = {
    **SD15_UNET,
    "sample_size": 96,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "upcast_attention": True,
}

# SDXL base: three resolutions instead of four, transformer depth 1/2/10, two text encoders (2048-wide
# hidden states, 1280-wide pooled embedding) and the size/crop conditioning ("text_time": 6 time ids of
# 256 sinusoidal features each, so the projection input is 1280 + 6 * 256 = 2816).
SDXL_UNET: Dict = {
    **_COMMON,
    "sample_size": 128,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}


@dataclass(frozen=True)
class UNetModel:
    """One published model: its U-Net config, native latent size and the FreeU factors its authors suggest.

    ``freeu`` is (b1, b2, s1, s2) from the FreeU repository's README for that model family.
    """

    key: str
    title: str
    config: Dict
    latent_size: int
    image_size: int
    freeu: Tuple[float, float, float, float]
    text_length: int = 77


MODELS: Dict[str, UNetModel] = {
    "sd15": UNetModel("sd15", "SD 1.5", SD15_UNET, latent_size=64, image_size=512, freeu=(1.5, 1.6, 0.9, 0.2)),
    "sd21": UNetModel("sd21", "SD 2.1", SD21_UNET, latent_size=96, image_size=768, freeu=(1.4, 1.6, 0.9, 0.2)),
    "sdxl": UNetModel("sdxl", "SDXL base", SDXL_UNET, latent_size=128, image_size=1024, freeu=(1.3, 1.4, 0.9, 0.2)),
}

# What reduced_config changes; the report quotes it so a reduced result is never read as the real model.
REDUCTION_NOTE = (
    "reduced: channels / 10 (320/640/1280 -> 32/64/128), one attention head per 32 channels, text width 64, "
    "pooled text width 64 and 16 time features (SDXL), 32x32 latents; block types, layers per block and "
    "transformer depths as published"
)


def reduced_config(config: Dict, channel_divisor: int = 10, latent_size: int = 32) -> Dict:
    """A CPU-sized copy of ``config`` with the same block structure (see REDUCTION_NOTE)."""
    if channel_divisor < 1:
        raise ValueError(f"channel_divisor must be >= 1, got {channel_divisor}")
    small = copy.deepcopy(config)
    channels = [max(32, c // channel_divisor) for c in config["block_out_channels"]]
    small["block_out_channels"] = channels
    # The published head settings do not divide the shrunken widths; one head per 32 channels does, and
    # the attention cost is not what this benchmark measures.
    small["attention_head_dim"] = [c // 32 for c in channels]
    small["cross_attention_dim"] = 64
    small["sample_size"] = latent_size
    if config.get("addition_embed_type") == "text_time":
        small["addition_time_embed_dim"] = 16
        small["projection_class_embeddings_input_dim"] = 64 + 6 * 16
    return small


def pooled_text_width(config: Dict) -> Optional[int]:
    """Width of SDXL's pooled text embedding implied by the config (None for models without one)."""
    if config.get("addition_embed_type") != "text_time":
        return None
    return config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]


def unet_inputs(config: Dict, batch: int, device: torch.device, dtype: torch.dtype, text_length: int = 77,
                seed: int = 0) -> Dict:
    """Keyword arguments for one ``UNet2DConditionModel.forward`` call at the config's latent size.

    SDXL-style configs also get ``added_cond_kwargs``: ``text_embeds`` (batch, pooled width) and
    ``time_ids`` (batch, 6) holding (original size, crop offset, target size) of a square image.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    generator = torch.Generator().manual_seed(seed)
    size = config["sample_size"]

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    kwargs = {
        "sample": randn(batch, config["in_channels"], size, size),
        "timestep": torch.tensor(500, device=device),
        "encoder_hidden_states": randn(batch, text_length, config["cross_attention_dim"]),
    }
    pooled = pooled_text_width(config)
    if pooled is not None:
        pixels = float(size * 8)
        time_ids = torch.tensor([[pixels, pixels, 0.0, 0.0, pixels, pixels]] * batch)
        kwargs["added_cond_kwargs"] = {
            "text_embeds": randn(batch, pooled),
            "time_ids": time_ids.to(device=device, dtype=dtype),
        }
    return kwargs
