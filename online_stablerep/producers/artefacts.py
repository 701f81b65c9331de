"""Few-step artefacts on top of a base model: LoRA adapters fused into the UNet, distilled UNets,
and the random-weight versions of both (and of AutoencoderTiny) that tests and throughput work
save and then load through the same diffusers paths as released ones.

Released artefacts this loads: LCM-LoRA (latent-consistency/lcm-lora-sdv1-5), TCD-LoRA
(h1t/TCD-SD15-LoRA), Hyper-SD LoRAs (ByteDance/Hyper-SD, with generator.lora_weight_name),
distilled UNets saved as diffusers folders (e.g. latent-consistency/lcm-sdxl), and
AutoencoderTiny (madebyollin/taesd, madebyollin/taesdxl).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderTiny,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

# The UNet layers random adapters touch: attention projections and feed-forwards (LCM-LoRA and
# Hyper-SD adapt these and more; the speed of a fused adapter does not depend on which).
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


def _error(key: str, value: str, err: Exception) -> ValueError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ValueError(f"generator.{key}={value!r}: could not be loaded ({first})")


def fuse_lora(parts: dict[str, Any], path: str, weight_name: str = "",
              scale: float = 1.0) -> None:
    """Load the adapter at `path` with diffusers' `load_lora_weights`, fuse it into the UNet
    (and text encoders, when it adapts them) at `scale`, and drop the adapter layers, so the
    modules in `parts` run at the base model's cost.

    Args:
        parts: "unet", "vae", "text_encoder", "tokenizer" (and "text_encoder_2",
            "tokenizer_2" for SDXL); modified in place.

    Raises:
        ValueError: naming generator.lora when the adapter cannot be loaded or does not fit.
    """
    common = {"vae": parts["vae"], "text_encoder": parts["text_encoder"],
              "tokenizer": parts["tokenizer"], "unet": parts["unet"], "scheduler": None}
    if "text_encoder_2" in parts:
        pipe = StableDiffusionXLPipeline(**common, text_encoder_2=parts["text_encoder_2"],
                                         tokenizer_2=parts["tokenizer_2"])
    else:
        pipe = StableDiffusionPipeline(**common, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    kwargs = {"weight_name": weight_name} if weight_name else {}
    try:
        pipe.load_lora_weights(path, adapter_name="distilled", **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise _error("lora", path, err) from err
    pipe.fuse_lora(lora_scale=scale, adapter_names=["distilled"])
    pipe.unload_lora_weights()


def load_unet(path: str, dtype: torch.dtype) -> UNet2DConditionModel:
    """A distilled UNet: a diffusers UNet folder or hub id, or a pipeline folder's unet/.

    Raises:
        ValueError: naming generator.unet when nothing loads from `path`.
    """
    subfolder = "unet" if (Path(path) / "unet" / "config.json").is_file() else None
    try:
        return UNet2DConditionModel.from_pretrained(path, subfolder=subfolder, dtype=dtype)
    except (OSError, ValueError) as err:
        raise _error("unet", path, err) from err


def load_tiny_vae(path: str, dtype: torch.dtype) -> AutoencoderTiny:
    """AutoencoderTiny weights from a local folder or hub id.

    Raises:
        ValueError: naming generator.tiny_vae when nothing loads from `path`.
    """
    try:
        return AutoencoderTiny.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as err:
        raise _error("tiny_vae", path, err) from err


def save_random_lora(unet: UNet2DConditionModel, path: str | Path, rank: int = 4,
                     std: float = 0.02, seed: int = 0) -> Path:
    """Save a random-weight LoRA adapter for `unet`'s architecture in diffusers' format
    (pytorch_lora_weights.safetensors in folder `path`); `unet` itself is left untouched.

    Both LoRA factors are random (peft initialises B to zero, which would be a no-op adapter).
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(unet).to("cpu", torch.float32)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
    StableDiffusionPipeline.save_lora_weights(str(path), unet_lora_layers=layers)
    return Path(path)


def random_tiny_vae(upsamplings: int = 3, width: int | None = None) -> AutoencoderTiny:
    """A random-weight AutoencoderTiny with `upsamplings` 2x upsamplings.

    3 upsamplings at width 64 (the default width then) is TAESD's architecture, for the SD VAE's
    8x; 1 matches the `tiny` architecture's 2x VAE, at width 16 by default so that it costs
    about what TAESD costs beside SD's VAE (6%).
    """
    width = width or (64 if upsamplings == 3 else 16)
    if upsamplings == 3 and width == 64:
        return AutoencoderTiny()  # diffusers' defaults are TAESD's configuration
    blocks = upsamplings + 1
    return AutoencoderTiny(encoder_block_out_channels=(width,) * blocks,
                           decoder_block_out_channels=(width,) * blocks,
                           num_encoder_blocks=(1,) * blocks, num_decoder_blocks=(1,) * blocks,
                           latent_channels=4)


def save_random_tiny_vae(path: str | Path, upsamplings: int = 3, width: int | None = None,
                         seed: int = 0) -> Path:
    """Save `random_tiny_vae(upsamplings, width)` with weights drawn from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = random_tiny_vae(upsamplings, width)
    model.save_pretrained(str(path))
    return Path(path)
