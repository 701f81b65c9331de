"""The diffusion producer: caption groups from a Stable Diffusion model."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from online_stablerep.config.schema import Config
from online_stablerep.config.validate import parse_guidance
from online_stablerep.distributed.env import default_device
from online_stablerep.producers.captions import CaptionSource
from online_stablerep.producers.pipeline import build_components
from online_stablerep.producers.sampling import Sampler, guidance_for_caption
from online_stablerep.producers.stream import CaptionStream
from online_stablerep.records import CaptionGroup

log = logging.getLogger(__name__)


class DiffusionProducer:
    """Makes `producer.captions_per_call` caption groups per call from its caption shard.

    The caption corpus is opened and validated when the producer is made; the model is built in
    `start()`. A group is a pure function of (producer.seed, epoch, caption id): its guidance
    scale derives from (seed, caption id) and the initial noise of each image from all three,
    so it is the same on any rank, in any batch, before or after a resume, and each pass over
    the captions makes new images.
    """

    def __init__(self, cfg: Config, shard: int, num_shards: int, rank: int = 0,
                 device: torch.device | str | None = None, max_epochs: int = 0) -> None:
        """`max_epochs`: passes over the captions (the trainer's train.epochs; 0: no end)."""
        self.cfg = cfg
        self.rank = rank
        self.device = torch.device(device) if device is not None else default_device()
        self.source = CaptionSource.open(cfg.captions)
        self.stream = CaptionStream(
            len(self.source), shard=shard, num_shards=num_shards, seed=cfg.producer.seed,
            shuffle=cfg.captions.shuffle, max_epochs=max_epochs,
        )
        self.scales = parse_guidance(cfg.generator.guidance)
        self.sampler: Sampler | None = None

    def start(self) -> None:
        """Build the model on the device and encode the negative prompt once."""
        g = self.cfg.generator
        t0 = time.perf_counter()
        components = build_components(g, self.device)
        self.sampler = Sampler.from_config(components, g)
        log.info("diffusion producer rank %d: %s on %s (%s, %d px, recipe %s, %s %d steps) "
                 "built in %.1fs", self.rank, g.model, self.device, components.dtype,
                 components.resolution, g.recipe or "none", g.scheduler, g.steps,
                 time.perf_counter() - t0)

    def next_groups(self) -> list[CaptionGroup]:
        """The groups of one batched call; an empty list once `train.epochs` is reached."""
        assert self.sampler is not None, "call start() first"
        p = self.cfg.producer
        taken = self.stream.take(p.captions_per_call)
        if not taken:
            return []
        ids = [caption_id for _, caption_id in taken]
        captions = [self.source.get(i) for i in ids]
        guidance = [guidance_for_caption(p.seed, i, self.scales) for i in ids]
        # A compiled UNet sees fixed shapes: pad a short last call with copies of its last caption.
        pad = p.captions_per_call - len(ids) if self.cfg.generator.compile else 0
        images = self.sampler.generate(
            captions + captions[-1:] * pad, taken + taken[-1:] * pad, guidance + guidance[-1:] * pad,
            k=p.images_per_caption, seed=p.seed, output_size=p.output_size,
        ).cpu()
        now = time.time()
        return [
            CaptionGroup(caption_id=caption_id, caption=caption, images_kchw=images[i],
                         guidance_scale=scale, seed=p.seed, producer_rank=self.rank,
                         created_at=now, epoch=epoch)
            for i, ((epoch, caption_id), caption, scale)
            in enumerate(zip(taken, captions, guidance, strict=True))
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])

    def close(self) -> None:
        """Free the model (and its device memory)."""
        self.sampler = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
