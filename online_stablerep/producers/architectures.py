"""Random-weight diffusion architectures by name, for tests, the CPU demo and throughput work.

Throughput does not depend on weight values, so full-size configs with random weights measure a
real checkpoint's speed without downloading one. `tiny` follows the small components diffusers'
own tests use (runs in well under a second per call on a CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from online_stablerep.producers.tokenizer import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE

# The noise schedule SD 1.x/2.x/XL were trained with (their scheduler_config.json).
SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "clip_sample": False,
    "set_alpha_to_one": False,
}

_SD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

# CLIP ViT-L/14's text tower (SD 1.x, and SDXL's first encoder).
_CLIP_L: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "projection_dim": 768, "hidden_act": "quick_gelu",
}
# OpenCLIP ViT-H/14's text tower without its last layer (SD 2.x).
_OPENCLIP_H: dict[str, Any] = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
    "num_attention_heads": 16, "projection_dim": 512, "hidden_act": "gelu",
}
# OpenCLIP ViT-bigG/14's text tower (SDXL's second encoder, with projection).
_OPENCLIP_BIGG: dict[str, Any] = {
    "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_attention_heads": 20, "projection_dim": 1280, "hidden_act": "gelu",
}


def _text_config(spec: dict[str, Any]) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        layer_norm_eps=1e-5,
        **spec,
    )


def _tiny() -> dict[str, Any]:
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=64,
        norm_num_groups=32,
    )
    # The full CLIP vocabulary keeps every real token id valid; the width stays tiny.
    text_encoder = CLIPTextModel(_text_config({
        "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
        "num_attention_heads": 4, "projection_dim": 32, "hidden_act": "quick_gelu",
    }))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


def _sd15() -> dict[str, Any]:
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    return {
        "unet": unet,
        "vae": AutoencoderKL(**_SD_VAE),
        "text_encoder": CLIPTextModel(_text_config(_CLIP_L)),
    }


def _sd21() -> dict[str, Any]:
    # SD 2.1 (768 px, v-prediction): head dims per block, linear projections, 1024-d context.
    unet = UNet2DConditionModel(
        sample_size=96,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        upcast_attention=True,
    )
    return {
        "unet": unet,
        "vae": AutoencoderKL(**_SD_VAE),
        "text_encoder": CLIPTextModel(_text_config(_OPENCLIP_H)),
        "scheduler_overrides": {"prediction_type": "v_prediction"},
        "pad_token": "!",
    }


def _sdxl() -> dict[str, Any]:
    unet = UNet2DConditionModel(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        # 1280 pooled text features + 6 size/crop conditions x 256.
        projection_class_embeddings_input_dim=2816,
    )
    vae = AutoencoderKL(**{**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025,
                           "force_upcast": True})
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": CLIPTextModel(_text_config(_CLIP_L)),
        "text_encoder_2": CLIPTextModelWithProjection(_text_config(_OPENCLIP_BIGG)),
        "pad_token_2": "!",
    }


ARCHITECTURES: dict[str, Callable[[], dict[str, Any]]] = {
    "tiny": _tiny,
    "sd15": _sd15,
    "sd21": _sd21,
    "sdxl": _sdxl,
}


def build_architecture(name: str, seed: int = 0) -> dict[str, Any]:
    """Random-weight modules of architecture `name`, identical on every rank for one `seed`.

    Returns:
        A dict with "unet", "vae", "text_encoder" (and "text_encoder_2" for sdxl) on the CPU in
        fp32, plus optional "scheduler_overrides", "pad_token", "pad_token_2".
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r} (known: {', '.join(ARCHITECTURES)})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts = ARCHITECTURES[name]()
    for key in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if key in parts:
            parts[key].eval().requires_grad_(False)
    return parts
