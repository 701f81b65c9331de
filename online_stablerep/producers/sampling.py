"""Our own sampling loop: n captions x k images per call, per-row guidance, reproducible noise.

It does what `StableDiffusionPipeline.__call__` does for the same latents, scheduler, steps and
guidance (tests/test_diffusion.py checks equality), minus what a producer does not need: no
safety checker, no PIL or numpy round trips, the negative prompt encoded once, each caption
encoded once for its k images, the output resized and quantised on the device.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from online_stablerep.config.schema import GeneratorConfig
from online_stablerep.faults import injected
from online_stablerep.producers.pipeline import Components

# channels_last convolutions silently return zeros when a tensor has 2^31 elements or more.
_MAX_ELEMENTS = 2**31


def image_seed(seed: int, epoch: int, caption_id: int, image_index: int) -> int:
    """The noise seed of image `image_index` of caption `caption_id` in pass `epoch` over the
    captions: a pure function, so a resumed run remakes identical groups while every epoch
    makes new images."""
    state = np.random.SeedSequence([seed, epoch, caption_id, image_index]).generate_state(2)
    return int(state[0]) << 32 | int(state[1])


def guidance_for_caption(seed: int, caption_id: int, scales: list[float]) -> float:
    """The guidance scale of caption `caption_id`, drawn from `scales` by (seed, caption id)."""
    if len(scales) == 1:
        return float(scales[0])
    rng = np.random.default_rng([seed, caption_id, 1])
    return float(scales[int(rng.integers(len(scales)))])


def initial_noise(seed: int, caption_keys: list[tuple[int, int]], k: int,
                  latent_chw: tuple[int, int, int]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Noise for k images of each (epoch, caption id), each image from its own CPU generator.

    Returns:
        (n * k, C, h, w) fp32 CPU noise, caption-major, and the n * k generators (their state
        continues into stochastic scheduler steps, so those stay reproducible too).
    """
    generators = [torch.Generator().manual_seed(image_seed(seed, e, c, j))
                  for e, c in caption_keys for j in range(k)]
    noise = torch.cat([torch.randn((1, *latent_chw), generator=g) for g in generators])
    return noise, generators


def _guidance_embedding(w_b: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM-distilled UNets take (guidance - 1) as a sinusoidal timestep condition."""
    w_b = w_b * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=w_b.device) * -(math.log(10000.0) / (half - 1)))
    emb = w_b[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 == 1 else emb


def scheduler_eta(g: GeneratorConfig) -> float:
    """The eta of the configured scheduler: its own key for DDIM and TCD, 0 for the others
    (each key belongs to one scheduler, so DDIM never inherits TCD's default of 0.3)."""
    return {"ddim": g.ddim_eta, "tcd": g.tcd_eta}.get(g.scheduler, 0.0)


@dataclass(frozen=True)
class StepKind:
    """How one sampling step runs."""

    # Runs the base (undistilled) UNet.
    base: bool
    # Classifier-free guidance: an unconditional and a conditional pass in one batched call.
    guided: bool
    # A full UNet pass (False: DeepCache's shallow pass on the kept deep feature).
    full: bool


def plan_steps(steps: int, guidance_interval: tuple[float, float] = (0.0, 1.0),
               base_steps: int = 0, deep_cache_every: int = 1, guidance: bool = True,
               distilled_embeds_guidance: bool = False) -> list[StepKind]:
    """The kind of each of `steps` steps; the sampler runs exactly this plan and the FLOP model
    (planning/flops.py) counts it.

    Args:
        guidance_interval: (lo, hi): step i is guided when lo <= i / steps < hi.
        base_steps: the first steps run the base UNet.
        deep_cache_every: a full pass every this many steps (and whenever the UNet or the
            batch rows change, since the kept feature belongs to one UNet and batch).
        guidance: whether any row of the call has guidance > 1.
        distilled_embeds_guidance: the distilled UNet takes guidance as an input (LCM UNets),
            so its steps are never guided.
    """
    lo, hi = guidance_interval
    kinds, key, since_full = [], None, 0
    for i in range(steps):
        base = i < base_steps
        guided = (guidance and lo <= i / steps < hi
                  and (base or not distilled_embeds_guidance))
        full = deep_cache_every == 1 or key != (base, guided) or since_full >= deep_cache_every
        key, since_full = (base, guided), (1 if full else since_full + 1)
        kinds.append(StepKind(base=base, guided=guided, full=full))
    return kinds


class NonFiniteImagesError(RuntimeError):
    """Some captions' images came out NaN or infinite.

    Attributes:
        images: (n, k, 3, H, W) uint8, the call's images (those of `bad` are meaningless).
        bad: indices of the captions whose images are not finite.
    """

    def __init__(self, images: torch.Tensor, bad: list[int]) -> None:
        super().__init__(f"non-finite images for captions {bad} of the call")
        self.images = images
        self.bad = bad


class Sampler:
    """Turns captions into uint8 image groups with the given components.

    Args:
        components: from `pipeline.build_components`.
        steps: scheduler steps.
        negative_prompt: the unconditional branch's prompt.
        vae_decode_chunk: images per VAE decode call (0 = all at once).
        guidance_interval: (lo, hi): classifier-free guidance only on steps i with
            lo <= i / steps < hi; the others make one conditional pass.
        base_steps: the first steps run `components.base_unet` (the undistilled model).
        deep_cache_every: with DeepCache UNets, a full UNet pass every this many steps.
        eta: stochasticity of a scheduler that takes one (DDIM, TCD; 0 = deterministic);
            ignored by the others.
    """

    def __init__(self, components: Components, steps: int, negative_prompt: str = "",
                 vae_decode_chunk: int = 0, guidance_interval: tuple[float, float] = (0.0, 1.0),
                 base_steps: int = 0, deep_cache_every: int = 1, eta: float = 0.0) -> None:
        assert base_steps == 0 or components.base_unet is not None, "base steps need a base UNet"
        assert deep_cache_every == 1 or components.deep_cache, "DeepCache needs DeepCacheUNets"
        self.c = components
        self.steps = steps
        self.faults = injected()
        self.vae_decode_chunk = vae_decode_chunk
        self.guidance_interval = (float(guidance_interval[0]), float(guidance_interval[1]))
        self.base_steps = base_steps
        self.deep_cache_every = deep_cache_every
        self.scheduler = components.scheduler_cls.from_config(components.scheduler_config)
        step_params = inspect.signature(self.scheduler.step).parameters
        self._step_kwargs = {"eta": eta} if "eta" in step_params else {}
        self._step_takes_generator = "generator" in step_params
        self._time_cond_dim = components.unet.config.time_cond_proj_dim
        self.negative = self._encode_negative(negative_prompt)

    @classmethod
    def from_config(cls, components: Components, g: GeneratorConfig) -> Sampler:
        """The sampler a generator config asks for."""
        return cls(components, g.steps, g.negative_prompt, g.vae_decode_chunk,
                   guidance_interval=tuple(g.guidance_interval), base_steps=g.base_steps,
                   deep_cache_every=g.deep_cache_every, eta=scheduler_eta(g))

    @torch.inference_mode()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text conditioning: (n, 77, D) embeddings and, for SDXL, (n, D2) pooled embeddings."""
        c = self.c
        if not c.is_sdxl:
            tokens = c.tokenizer(captions, padding="max_length", truncation=True,
                                 max_length=c.tokenizer.model_max_length, return_tensors="pt")
            mask = None
            if getattr(c.text_encoder.config, "use_attention_mask", False):
                mask = tokens.attention_mask.to(c.device)
            return c.text_encoder(tokens.input_ids.to(c.device), attention_mask=mask)[0], None
        hidden, pooled = [], None
        for tokenizer, encoder in ((c.tokenizer, c.text_encoder), (c.tokenizer_2, c.text_encoder_2)):
            tokens = tokenizer(captions, padding="max_length", truncation=True,
                               max_length=tokenizer.model_max_length, return_tensors="pt")
            out = encoder(tokens.input_ids.to(c.device), output_hidden_states=True)
            pooled = out[0]  # the last encoder's projected pooled output
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    def _encode_negative(self, negative_prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        embeds, pooled = self.encode([negative_prompt])
        if self.c.force_zeros_for_empty_prompt and not negative_prompt:
            embeds = torch.zeros_like(embeds)
            pooled = torch.zeros_like(pooled) if pooled is not None else None
        return embeds, pooled

    @torch.inference_mode()
    def denoise(self, latents: torch.Tensor, cond: torch.Tensor, pooled: torch.Tensor | None,
                guidance_b: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """Run the scheduler's steps from initial noise.

        Args:
            latents: (B, C, h, w) unscaled initial noise on any device.
            cond: (B, 77, D) text embeddings, one row per image.
            pooled: (B, D2) SDXL pooled text embeddings, else None.
            guidance_b: (B,) guidance scale per image; rows <= 1 need no unconditional branch.
            generators: B CPU generators for stochastic scheduler steps.

        Returns:
            (B, C, h, w) fp32 final latents.
        """
        c, batch = self.c, latents.shape[0]
        any_guided = bool((guidance_b > 1).any())
        guidance_b = guidance_b.to(c.device, torch.float32)
        # Rows with guidance <= 1 take scale 1 (= cond) in a guided step.
        scale = guidance_b.clamp(min=1.0).view(batch, 1, 1, 1)
        # An LCM-distilled UNet takes guidance as an input instead of a second pass.
        timestep_cond = None
        if self._time_cond_dim is not None:
            timestep_cond = _guidance_embedding(guidance_b - 1, self._time_cond_dim).to(c.dtype)
        # Conditioning of a plain pass and of a guided pass (one batched call [uncond; cond]).
        plain = {"encoder_hidden_states": cond, "added_cond_kwargs": None}
        both = {"encoder_hidden_states": torch.cat([self.negative[0].expand(batch, -1, -1), cond]),
                "added_cond_kwargs": None}
        if c.is_sdxl:
            side = c.resolution
            time_ids = torch.tensor([[side, side, 0, 0, side, side]], device=c.device,
                                    dtype=c.dtype)
            plain["added_cond_kwargs"] = {"text_embeds": pooled,
                                          "time_ids": time_ids.expand(batch, -1)}
            both["added_cond_kwargs"] = {
                "text_embeds": torch.cat([self.negative[1].expand(batch, -1), pooled]),
                "time_ids": time_ids.expand(2 * batch, -1)}
        self.scheduler.set_timesteps(self.steps, device=c.device)
        step_kwargs = dict(self._step_kwargs)
        if self._step_takes_generator:
            step_kwargs["generator"] = generators
        plan = plan_steps(self.steps, self.guidance_interval, self.base_steps,
                          self.deep_cache_every, guidance=any_guided,
                          distilled_embeds_guidance=timestep_cond is not None)
        feature = None
        # Latents stay fp32 between steps; only the UNet runs in the model dtype.
        latents = latents.to(c.device, torch.float32) * self.scheduler.init_noise_sigma
        for kind, t in zip(plan, self.scheduler.timesteps, strict=True):
            # 1. Which UNet (the base model for the first base_steps) and whether to guide.
            unet = c.base_unet if kind.base else c.unet
            embeds_guidance = not kind.base and timestep_cond is not None
            x = torch.cat([latents, latents]) if kind.guided else latents
            x = self.scheduler.scale_model_input(x, t).to(c.dtype)
            kwargs = {**(both if kind.guided else plain),
                      "timestep_cond": timestep_cond if embeds_guidance else None}
            if c.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            # 2. The UNet pass: full, or DeepCache's shallow pass on the kept deep feature.
            if c.deep_cache:
                eps, kept = unet(x, t, cached=None if kind.full else feature, **kwargs)
                if kind.full:
                    feature = kept.clone() if c.cuda_graphs else kept
            else:
                eps = unet(x, t, return_dict=False, **kwargs)[0]
            eps = eps.float().clone() if c.cuda_graphs else eps.float()
            # 3. Guidance, then the scheduler step.
            if kind.guided:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + scale * (eps_cond - eps_uncond)
            latents = self.scheduler.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
        return latents

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> (B, 3, H, W) fp32 images in [0, 1], in VAE chunks."""
        vae = self.c.vae
        vae_dtype = next(vae.parameters()).dtype
        chunk = self.vae_decode_chunk or latents.shape[0]
        widths = getattr(vae.config, "block_out_channels", None) or vae.config.decoder_block_out_channels
        side = latents.shape[-1] * self.c.vae_scale_factor
        if chunk * max(widths[:2]) * side * side >= _MAX_ELEMENTS:
            raise ValueError(
                f"generator.vae_decode_chunk={self.vae_decode_chunk}: decoding {chunk} images of "
                f"{side} px at once passes 2^31 elements per activation (channels_last convs then "
                "return zeros); lower it"
            )
        images = [
            vae.decode(z.to(vae_dtype) / vae.config.scaling_factor, return_dict=False)[0]
            for z in latents.split(chunk)
        ]
        return (torch.cat(images).float() / 2 + 0.5).clamp(0, 1)

    def generate(self, captions: list[str], caption_keys: list[tuple[int, int]],
                 guidance: list[float], k: int, seed: int, output_size: int) -> torch.Tensor:
        """k images for each of n captions, keyed by (epoch, caption id), in one batched call.

        Returns:
            (n, k, 3, output_size, output_size) uint8 on the components' device.
        """
        c, n = self.c, len(captions)
        cond, pooled = self.encode(captions)
        cond = cond.repeat_interleave(k, dim=0)
        pooled = pooled.repeat_interleave(k, dim=0) if pooled is not None else None
        side = c.resolution // c.vae_scale_factor
        channels = c.unet.config.in_channels
        noise, generators = initial_noise(seed, caption_keys, k, (channels, side, side))
        guidance_b = torch.tensor(guidance, dtype=torch.float32).repeat_interleave(k)
        latents = self.denoise(noise, cond, pooled, guidance_b, generators)
        images = self.decode(latents)
        with torch.inference_mode():
            for i, (_, caption_id) in enumerate(caption_keys):
                if caption_id == self.faults.nonfinite_caption:  # tests only
                    images[i * k:(i + 1) * k] = float("nan")
            # A diverged sample (NaN or inf) would turn into an arbitrary uint8 image.
            finite = torch.isfinite(images.reshape(n, -1)).all(dim=1).tolist()
            if images.shape[-1] != output_size:
                images = F.interpolate(images, size=(output_size, output_size), mode="bilinear",
                                       antialias=True, align_corners=False)
            images = (images.nan_to_num(0.0) * 255).round_().to(torch.uint8)
        images = images.view(n, k, 3, output_size, output_size)
        if not all(finite):
            raise NonFiniteImagesError(images, [i for i, ok in enumerate(finite) if not ok])
        return images
