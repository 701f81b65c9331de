"""The performance model: FLOPs per generated image and per trained view, device peaks, and the
utilisation assumed when nothing has been measured.

FLOPs are counted, not quoted: `torch.utils.flop_counter.FlopCounterMode` runs the real modules
(the random-weight diffusers architectures of `producers.architectures`, the timm backbone and
projection head of `models.encoder`) on the meta device, so counting a full-size SDXL UNet costs
no memory and about a second. For SD1.5 at 512 this reproduces the published figures: 803 GFLOP
per UNet forward and 2.5 TFLOP per VAE decode (../PAPER.md, "Cost").
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from online_stablerep.config.schema import Config
from online_stablerep.config.validate import parse_guidance

# Dense bf16 tensor-core peak in TFLOP/s (vendor datasheets, without sparsity).
PEAK_BF16_TFLOPS: dict[str, float] = {
    "h100": 989.0,  # H100 SXM
    "h100-pcie": 756.0,
    "h200": 989.0,
    "a100": 312.0,
}

# torch.cuda.get_device_name() -> key of PEAK_BF16_TFLOPS, by exact name.
CUDA_DEVICE_NAMES: dict[str, str] = {
    "NVIDIA H100 80GB HBM3": "h100",
    "NVIDIA H100": "h100",
    "NVIDIA H100 PCIe": "h100-pcie",
    "NVIDIA H200": "h200",
    "NVIDIA A100-SXM4-80GB": "a100",
    "NVIDIA A100-SXM4-40GB": "a100",
    "NVIDIA A100 80GB PCIe": "a100",
    "NVIDIA A100-PCIE-40GB": "a100",
}

# Fraction of the bf16 peak assumed when a throughput is ESTIMATED rather than measured.
# Generation: ../PAPER.md puts SD1.5 at 20 steps with guidance at "realistically 6-12 images/s"
# on an H100 against a 28.5 images/s bound, i.e. 21-42% of peak; 30% is the middle.
GENERATION_UTILISATION = 0.30
# Training: eager PyTorch ViT-B/16 with bf16 and fused attention typically reaches 20-30% MFU
# at per-GPU batches of a few hundred rows; 25% is assumed until the trainer benchmark has run.
TRAINING_UTILISATION = 0.25


def peak_flops(gpu: str) -> float:
    """Dense bf16 peak of `gpu` (a key of PEAK_BF16_TFLOPS) in FLOP/s.

    Raises:
        ValueError: for an unknown GPU name.
    """
    if gpu not in PEAK_BF16_TFLOPS:
        raise ValueError(f"unknown GPU {gpu!r} (known: {', '.join(PEAK_BF16_TFLOPS)})")
    return PEAK_BF16_TFLOPS[gpu] * 1e12


def cuda_peak_flops(device_name: str) -> float | None:
    """Peak of a CUDA device by its exact `torch.cuda.get_device_name()`; None if not listed."""
    gpu = CUDA_DEVICE_NAMES.get(device_name)
    return peak_flops(gpu) if gpu else None


@dataclass(frozen=True)
class DiffusionFlops:
    """Counted FLOPs of one diffusion architecture at one resolution."""

    architecture: str
    resolution: int
    # One UNet forward for one image and one guidance branch.
    unet_forward: float
    # One VAE decode of one image.
    vae_decode: float
    # Encoding one prompt with every text encoder of the architecture.
    text_encode: float
    # DeepCache's shallow UNet pass (conv_in, first down block, last up block) for one image.
    unet_cached_forward: float = 0.0
    # AutoencoderTiny (TAESD architecture at the VAE's scale factor) decode of one image.
    tiny_vae_decode: float = 0.0


@functools.cache
def count_diffusion_flops(architecture: str, resolution: int = 0) -> DiffusionFlops:
    """Count the FLOPs of a named random-weight architecture ("sd15", "sd21", "sdxl", "tiny") or
    of the shipped toy model ("toy", whose architecture is known without loading it).

    Args:
        architecture: a key of `producers.architectures.ARCHITECTURES`, or "toy".
        resolution: image side in pixels; 0 = the architecture's native size.

    Raises:
        ValueError: when `architecture` is not a named architecture (a checkpoint path or hub id
            cannot be counted without loading it: measure it with benchmarks/generator.py).
    """
    from online_stablerep.producers.architectures import ARCHITECTURES
    from online_stablerep.producers.artefacts import random_tiny_vae
    from online_stablerep.producers.feature_cache import DeepCacheUNet
    from online_stablerep.toy.models import build_parts

    builders = {**ARCHITECTURES, "toy": build_parts}
    if architecture not in builders:
        raise ValueError(
            f"generator.model={architecture!r}: FLOPs can only be counted for the named "
            f"architectures ({', '.join(builders)}); pass a measured --gen-images-per-s"
        )
    with torch.device("meta"), torch.no_grad():
        parts = builders[architecture]()
        unet, vae = parts["unet"], parts["vae"]
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        resolution = resolution or int(unet.config.sample_size) * scale
        latent = torch.empty(1, int(unet.config.in_channels), resolution // scale,
                             resolution // scale)
        context = torch.empty(1, 77, int(unet.config.cross_attention_dim))
        extra = {}
        if "text_encoder_2" in parts:
            pooled = int(parts["text_encoder_2"].config.projection_dim)
            extra = {"added_cond_kwargs": {"text_embeds": torch.empty(1, pooled),
                                           "time_ids": torch.empty(1, 6)}}
        tokens = torch.zeros(1, 77, dtype=torch.long)
        with FlopCounterMode(display=False) as unet_count:
            unet(latent, torch.tensor([500]), encoder_hidden_states=context, **extra)
        deep = DeepCacheUNet(unet)
        _, feature = deep(latent, torch.tensor([500]), context, **extra)
        with FlopCounterMode(display=False) as cached_count:
            deep(latent, torch.tensor([500]), context, cached=feature, **extra)
        tiny_vae = random_tiny_vae(upsamplings=len(vae.config.block_out_channels) - 1)
        with FlopCounterMode(display=False) as tiny_count:
            tiny_vae.decode(latent)
        with FlopCounterMode(display=False) as vae_count:
            vae.decode(latent)
        with FlopCounterMode(display=False) as text_count:
            for key in ("text_encoder", "text_encoder_2"):
                if key in parts:
                    parts[key](tokens)
    return DiffusionFlops(
        architecture=architecture,
        resolution=resolution,
        unet_forward=float(unet_count.get_total_flops()),
        vae_decode=float(vae_count.get_total_flops()),
        text_encode=float(text_count.get_total_flops()),
        unet_cached_forward=float(cached_count.get_total_flops()),
        tiny_vae_decode=float(tiny_count.get_total_flops()),
    )


def flops_per_generated_image(
    counted: DiffusionFlops, steps: int, guidance_scales: list[float], images_per_caption: int,
    guidance_interval: tuple[float, float] = (0.0, 1.0), base_steps: int = 0,
    deep_cache_every: int = 1, tiny_vae: bool = False,
) -> float:
    """UNet passes over the sampler's step plan + VAE decode + text encoding shared by a group.

    A guided step costs the CFG factor of UNet passes: the mean over the guidance scales drawn
    of 2 (conditional and unconditional pass) for a scale > 1, else 1; a step outside
    `guidance_interval` costs one pass. DeepCache's shallow steps cost `unet_cached_forward`.
    A fused LoRA adapter or a distilled UNet of the same architecture costs what the base UNet
    does. Every scheduler offered makes one UNet evaluation per step.
    """
    from online_stablerep.producers.sampling import plan_steps

    cfg_factor = sum(2.0 if s > 1.0 else 1.0 for s in guidance_scales) / len(guidance_scales)
    plan = plan_steps(steps, guidance_interval, base_steps, deep_cache_every,
                      guidance=cfg_factor > 1.0)
    unet = sum((cfg_factor if kind.guided else 1.0)
               * (counted.unet_forward if kind.full else counted.unet_cached_forward)
               for kind in plan)
    text = counted.text_encode * (cfg_factor if any(k.guided for k in plan) else 1.0)
    decode = counted.tiny_vae_decode if tiny_vae else counted.vae_decode
    return unet + decode + text / images_per_caption


# Hub ids of released checkpoints whose architecture is one of the named random-weight ones.
KNOWN_CHECKPOINTS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "runwayml/stable-diffusion-v1-5": "sd15",
    "CompVis/stable-diffusion-v1-4": "sd15",
    "stabilityai/stable-diffusion-2-1": "sd21",
    "stabilityai/stable-diffusion-2-1-base": "sd21",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "stabilityai/sdxl-turbo": "sdxl",
}


def generator_flops_per_image(cfg: Config) -> float:
    """FLOPs per generated image for the generator section of `cfg`, with its recipe's levers
    (named architectures, or a released checkpoint of one of them, by hub id)."""
    g = cfg.generator
    counted = count_diffusion_flops(KNOWN_CHECKPOINTS.get(g.model, g.model), g.resolution)
    return flops_per_generated_image(
        counted, g.steps, parse_guidance(g.guidance), cfg.producer.images_per_caption,
        guidance_interval=tuple(g.guidance_interval), base_steps=g.base_steps,
        deep_cache_every=g.deep_cache_every, tiny_vae=bool(g.tiny_vae),
    )


def count_train_flops(cfg: Config, rows: int) -> float:
    """FLOPs of one forward + backward of the StableRep model on `rows` views.

    Counted on the meta device over backbone and projection head; the loss (rows^2 x embed
    dim) and the optimizer step are left out, both well under 1% for the paper's shapes.
    """
    from online_stablerep.models.encoder import build_model

    k = cfg.batch.views_per_caption
    if rows % k:
        raise ValueError(f"{rows} rows do not split into batch.views_per_caption={k} views")
    size = cfg.model.image_size
    with torch.device("meta"):
        model = build_model(cfg.model)
        images = torch.empty(rows, 3, size, size)
        with FlopCounterMode(display=False) as count:
            model(images, views_per_caption=k)["image_embed"].sum().backward()
    return float(count.get_total_flops())


def train_flops_per_view(cfg: Config) -> float:
    """FLOPs of training on one view (forward + backward), counted for the config's batch."""
    rows = cfg.batch.captions_per_batch * cfg.batch.views_per_caption
    return count_train_flops(cfg, rows) / rows


def flop_text(value: float) -> str:
    """FLOPs with an SI prefix, e.g. "34.6 TFLOP"."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}FLOP"
    return f"{value:.3g} FLOP"


def estimated_rate(flops_per_item: float, gpu: str, utilisation: float) -> float:
    """Items per second on one `gpu` running at `utilisation` of its bf16 peak."""
    return peak_flops(gpu) * utilisation / flops_per_item
