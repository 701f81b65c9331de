"""Build the diffusion components a producer samples with: from a checkpoint or by architecture.

We keep the components (UNet, VAE, text encoders, tokenizers, scheduler config) rather than a
diffusers pipeline object: the sampling loop in `sampling.py` is our own, and no safety checker or
image processor is ever loaded.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from importlib.util import find_spec
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionPipeline,
    TCDScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from online_stablerep.config.schema import GeneratorConfig
from online_stablerep.producers.architectures import (
    ARCHITECTURES,
    SD_SCHEDULER_CONFIG,
    build_architecture,
)
from online_stablerep.producers.artefacts import fuse_lora, load_tiny_vae, load_unet
from online_stablerep.producers.feature_cache import DeepCacheUNet
from online_stablerep.producers.shipped import SHIPPED_ADAPTERS, SHIPPED_MODELS
from online_stablerep.producers.tokenizer import build_clip_tokenizer, check_vocab_size

log = logging.getLogger(__name__)

SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "dpm++": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "ddim": DDIMScheduler,
    "lcm": LCMScheduler,
    "tcd": TCDScheduler,
}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}



@dataclass
class Components:
    """The modules of one SD 1.x/2.x/XL model, on their device, in inference mode."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    # Scheduler class and the config every sampling call instantiates it from.
    scheduler_cls: type[SchedulerMixin]
    scheduler_config: dict[str, Any]
    device: torch.device
    # dtype of the UNet and text encoders.
    dtype: torch.dtype
    # Pixels per latent cell (8 for SD).
    vae_scale_factor: int
    # Generation side in pixels.
    resolution: int
    # SDXL only: second text encoder (with projection) and its tokenizer.
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: Any = None
    # SDXL: an empty negative prompt means zero embeddings, as the model was trained.
    force_zeros_for_empty_prompt: bool = False
    # The undistilled UNet the first generator.base_steps steps run, when `unet` is distilled.
    base_unet: torch.nn.Module | None = None
    # The UNets are DeepCacheUNet wrappers (generator.deep_cache_every > 1).
    deep_cache: bool = False
    # The compiled UNets replay CUDA graphs: outputs are overwritten by the next replay.
    cuda_graphs: bool = False

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" is bf16 on GPU and fp32 on CPU (CPU half precision is slow and inexact)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def _load_checkpoint(model: str, dtype: torch.dtype) -> dict[str, Any]:
    try:
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, safety_checker=None)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"generator.model={model!r}: no diffusers pipeline could be loaded from it ({err}). "
            f"Give a local diffusers folder, a hub id, {', '.join(SHIPPED_MODELS)} for a model "
            f"shipped in the package, or one of {', '.join(ARCHITECTURES)} for random weights"
        ) from err
    parts: dict[str, Any] = {
        "unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder,
        "tokenizer": pipe.tokenizer, "scheduler_config": dict(pipe.scheduler.config),
    }
    if getattr(pipe, "text_encoder_2", None) is not None:
        parts["text_encoder_2"] = pipe.text_encoder_2
        parts["tokenizer_2"] = pipe.tokenizer_2
        parts["force_zeros"] = bool(pipe.config.get("force_zeros_for_empty_prompt", True))
    for key in ("tokenizer", "tokenizer_2"):
        encoder = parts.get("text_encoder" if key == "tokenizer" else "text_encoder_2")
        if key in parts:
            check_vocab_size(parts[key], encoder.config.vocab_size, f"{model} ({key})")
    return parts


def _build_random(name: str) -> dict[str, Any]:
    parts = build_architecture(name)
    parts["tokenizer"] = build_clip_tokenizer(pad_token=parts.pop("pad_token", "<|endoftext|>"))
    if "text_encoder_2" in parts:
        parts["tokenizer_2"] = build_clip_tokenizer(pad_token=parts.pop("pad_token_2"))
        parts["force_zeros"] = True
    parts["scheduler_config"] = {**SD_SCHEDULER_CONFIG, **parts.pop("scheduler_overrides", {})}
    return parts


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype,
           memory_format: torch.memory_format) -> None:
    # Cast only when needed: diffusers warns on every dtype cast of a model.
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    # channels_last applies to 4-d weights (convolutions) only, so text encoders are unaffected.
    module.to(device=device, memory_format=memory_format).eval().requires_grad_(False)


def _set_attention(modules: list[torch.nn.Module], backend: str) -> None:
    if backend != "xformers":
        return  # diffusers' default processors already use torch SDPA.
    if find_spec("xformers") is None:
        warnings.warn(
            "generator.attention=xformers but xformers is not installed: using SDPA",
            stacklevel=3,
        )
        return
    for module in modules:
        module.enable_xformers_memory_efficient_attention()


def build_components(cfg: GeneratorConfig, device: torch.device | str) -> Components:
    """Load `cfg.model` (checkpoint dir, hub id, shipped model or architecture name) onto
    `device`, with the speed levers of `cfg` applied: distilled UNet or fused LoRA adapter
    (keeping the base UNet when generator.base_steps > 0), tiny VAE, fused QKV, DeepCache,
    torch.compile.

    Raises:
        ValueError: naming the key, for a tokenizer with the wrong vocabulary or an artefact
            (generator.model, lora, unet, tiny_vae) that cannot be loaded.
    """
    device = torch.device(device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.model in ARCHITECTURES:
        parts = _build_random(cfg.model)
    else:
        parts = _load_checkpoint(str(SHIPPED_MODELS.get(cfg.model, cfg.model)), dtype)
    vae = parts["vae"]
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    base_unet = copy.deepcopy(parts["unet"]) if cfg.base_steps > 0 else None
    if cfg.unet:
        parts["unet"] = load_unet(cfg.unet, dtype)
    if cfg.lora:
        fuse_lora(parts, str(SHIPPED_ADAPTERS.get(cfg.lora, cfg.lora)), cfg.lora_weight_name,
                  cfg.lora_scale)
    unet = parts["unet"]
    if cfg.tiny_vae:
        vae = load_tiny_vae(cfg.tiny_vae, dtype)
    # fp16 overflows in some VAEs (SDXL's says so in force_upcast): decode those in fp32.
    upcast_vae = dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    vae_dtype = torch.float32 if upcast_vae else dtype
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    encoders = [parts["text_encoder"]] + ([parts["text_encoder_2"]] if "text_encoder_2" in parts
                                          else [])
    unets = [unet] + ([base_unet] if base_unet is not None else [])
    for module, module_dtype in ([(u, dtype) for u in unets] + [(vae, vae_dtype)]
                                 + [(e, dtype) for e in encoders]):
        _place(module, device, module_dtype, memory_format)
    _set_attention([*unets, vae], cfg.attention)
    if cfg.fuse_qkv:
        for module in unets:
            module.fuse_qkv_projections()
    sample_size = int(unet.config.sample_size)
    if cfg.deep_cache_every > 1:
        unets = [DeepCacheUNet(u) for u in unets]
    if cfg.compile:
        # Shapes are fixed by padding every call to producer.captions_per_call captions.
        mode = None if cfg.compile_mode == "default" else cfg.compile_mode
        unets = [torch.compile(u, dynamic=False, mode=mode) for u in unets]
    unet, base_unet = unets[0], (unets[1] if len(unets) > 1 else None)
    scheduler_config = dict(parts["scheduler_config"])
    if cfg.timestep_spacing:
        scheduler_config["timestep_spacing"] = cfg.timestep_spacing
    # Latents are not images in [-1, 1]: DDIM's clip_sample (on when a config, like the toy
    # model's DPM-Solver one, does not name it) would clip the predicted latent. Diffusers'
    # StableDiffusionPipeline turns it off the same way, and the official ldm DDIM never clips.
    scheduler_config["clip_sample"] = False
    resolution = cfg.resolution or sample_size * vae_scale_factor
    return Components(
        unet=unet,
        vae=vae,
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        scheduler_cls=SCHEDULERS[cfg.scheduler],
        scheduler_config=scheduler_config,
        device=device,
        dtype=dtype,
        vae_scale_factor=vae_scale_factor,
        resolution=resolution,
        text_encoder_2=parts.get("text_encoder_2"),
        tokenizer_2=parts.get("tokenizer_2"),
        force_zeros_for_empty_prompt=parts.get("force_zeros", False),
        base_unet=base_unet,
        deep_cache=cfg.deep_cache_every > 1,
        cuda_graphs=(cfg.compile and device.type == "cuda"
                     and cfg.compile_mode in ("reduce-overhead", "max-autotune")),
    )


def stock_pipeline(c: Components) -> StableDiffusionPipeline:
    """Diffusers' own StableDiffusionPipeline over the same components (no safety checker): the
    reference our sampler is checked and benchmarked against."""
    pipe = StableDiffusionPipeline(
        vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
        scheduler=c.scheduler_cls.from_config(c.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
