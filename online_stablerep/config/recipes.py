"""Named generator recipes: each a documented set of sampler settings and speed levers picked
with one key, `generator.recipe=paper|dpm20|fast|turbo`. "Recipe" means only this in the
project; the training hyper-parameters of the paper are the `sd15_vitb16` preset.

A recipe's levers replace the preset's generator keys; `key=value` overrides replace the
recipe's (so `generator.recipe=fast generator.lora=/my/lcm-lora` keeps the recipe and swaps the
adapter). The adapters named here are released for the SD1.5 architecture; with another model
or offline, point `generator.lora` / `generator.tiny_vae` at matching artefacts; the shipped toy
model takes its own distilled student instead (SHIPPED_MODEL_LEVERS). What each recipe
costs in quality, as far as is known, is in docs/recipes.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Recipe:
    """One named set of generator levers."""

    # One line: what the recipe does and what it costs.
    summary: str
    # generator.* keys and their values.
    levers: dict[str, Any] = field(default_factory=dict)


# Levers every recipe sets, so switching recipes never inherits another recipe's choices.
_NEUTRAL: dict[str, Any] = {
    "scheduler": "dpm++", "steps": 20, "timestep_spacing": "", "tcd_eta": 0.3, "ddim_eta": 0.0,
    "lora": "", "lora_weight_name": "", "lora_scale": 1.0, "unet": "", "base_steps": 0,
    "guidance_interval": [0.0, 1.0], "deep_cache_every": 1, "tiny_vae": "",
    "compile": True, "compile_mode": "reduce-overhead", "fuse_qkv": True,
}

RECIPES: dict[str, Recipe] = {
    "paper": Recipe(
        summary="the official generation's sampler (DDIM, 50 steps, eta 0, guidance on every "
                "step, full VAE; the preset's guidance 2.0, 512 px, stored at 256) with only "
                "levers that keep the images: compiled UNet with CUDA graphs at fixed shapes "
                "and fused QKV projections",
        levers={**_NEUTRAL, "scheduler": "ddim", "steps": 50},
    ),
    "dpm20": Recipe(
        summary="20 DPM-Solver++ steps, guidance on every step, full VAE, compiled with fused "
                "QKV: 2.5x fewer UNet passes than the paper's DDIM-50 (not the paper's sampler)",
        levers=dict(_NEUTRAL),
    ),
    "fast": Recipe(
        summary="4 LCM steps with LCM-LoRA fused into the UNet; the first step runs the base "
                "model with classifier-free guidance (keeps the layout diversity of the base "
                "model, arXiv 2503.10637), the other three one conditional pass each; "
                "AutoencoderTiny decode",
        levers={**_NEUTRAL, "scheduler": "lcm", "steps": 4,
                "lora": "latent-consistency/lcm-lora-sdv1-5", "base_steps": 1,
                "guidance_interval": [0.0, 0.25], "tiny_vae": "madebyollin/taesd"},
    ),
    "turbo": Recipe(
        summary="1 TCD step (from t=999) of the Hyper-SD 1-step LoRA, no guidance, TCD eta 1 "
                "(fresh noise for diversity), AutoencoderTiny decode",
        levers={**_NEUTRAL, "scheduler": "tcd", "steps": 1, "tcd_eta": 1.0, "lora": "ByteDance/Hyper-SD",
                "lora_weight_name": "Hyper-SD15-1step-lora.safetensors",
                "guidance_interval": [0.0, 0.0], "tiny_vae": "madebyollin/taesd"},
    ),
}


# A shipped model's own students replace the recipe's released adapters (which fit SD1.5 only):
# (generator.model, recipe) -> levers that replace the recipe's. The toy model keeps its own
# VAE (already smaller than AutoencoderTiny) and runs eager: it is the CPU demo's model, and on
# a CPU the compile warm-up would outlast a short run.
SHIPPED_MODEL_LEVERS: dict[tuple[str, str], dict[str, Any]] = {
    ("toy", "fast"): {"lora": "toy-lcm-lora", "tiny_vae": "", "compile": False},
}


def recipe_levers(name: str, model: str = "") -> dict[str, Any]:
    """The generator.* keys of recipe `name` ("" = none: no keys) for generator.model `model`.

    Raises:
        ValueError: naming generator.recipe for an unknown name.
    """
    if name == "":
        return {}
    if name not in RECIPES:
        raise ValueError(f"generator.recipe={name!r} is not one of {', '.join(RECIPES)} "
                         "(or \"\" for none)")
    return {**RECIPES[name].levers, **SHIPPED_MODEL_LEVERS.get((model, name), {})}
