"""The diffusion producer: caption groups from a Stable Diffusion model."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from online_stablerep.config.schema import Config
from online_stablerep.config.validate import parse_guidance
from online_stablerep.distributed.env import default_device
from online_stablerep.faults import injected
from online_stablerep.producers.captions import CaptionSource
from online_stablerep.producers.pipeline import build_components
from online_stablerep.producers.sampling import (
    NonFiniteImagesError,
    Sampler,
    guidance_for_caption,
)
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
        self.faults = injected()
        # Groups given up, by cause, and calls retried in halves after an out-of-memory error:
        # a generator's recoverable errors, reported to the trainers instead of ending the job.
        self.skipped = {"out_of_memory": 0, "non_finite": 0}
        self.retries = 0

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
        # A compiled UNet sees fixed shapes: pad a short last call with copies of its last caption.
        pad = p.captions_per_call - len(taken) if self.cfg.generator.compile else 0
        made = self._make(taken + taken[-1:] * pad)
        # Drop the padding's copies (identical groups: (epoch, caption id) keys a group).
        return list({(g.epoch, g.caption_id): g for g in made}.values())

    def _make(self, taken: list[tuple[int, int]]) -> list[CaptionGroup]:
        """The groups of (epoch, caption id) pairs `taken`, in one call when memory allows: on
        an out-of-memory error the call is retried in halves (down to one caption, whose group
        is then skipped), and a caption whose images come out non-finite is skipped; both are
        counted in `skipped`. The groups are the same whatever the split (per-image seeds)."""
        p = self.cfg.producer
        assert self.sampler is not None, "call start() first"
        ids = [caption_id for _, caption_id in taken]
        captions = [self.source.get(i) for i in ids]
        guidance = [guidance_for_caption(p.seed, i, self.scales) for i in ids]
        keep = list(range(len(taken)))
        try:
            if self.faults.oom(ids):  # tests only
                raise torch.OutOfMemoryError(f"injected: a call of {len(ids)} captions")
            images = self.sampler.generate(captions, taken, guidance, k=p.images_per_caption,
                                           seed=p.seed, output_size=p.output_size)
        except torch.OutOfMemoryError as err:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(taken) == 1:
                self.skipped["out_of_memory"] += 1
                log.warning("producer rank %d: out of memory on one caption (id %d): group "
                            "skipped (%s)", self.rank, ids[0], str(err).splitlines()[0])
                return []
            self.retries += 1
            log.warning("producer rank %d: out of memory on a call of %d captions: retrying in "
                        "halves", self.rank, len(taken))
            half = len(taken) // 2
            return self._make(taken[:half]) + self._make(taken[half:])
        except NonFiniteImagesError as err:
            images = err.images
            keep = [i for i in keep if i not in err.bad]
            self.skipped["non_finite"] += len(err.bad)
            log.warning("producer rank %d: non-finite images for caption ids %s: groups "
                        "skipped", self.rank, [ids[i] for i in err.bad])
        images = images.cpu()
        now = time.time()
        return [
            CaptionGroup(caption_id=ids[i], caption=captions[i], images_kchw=images[i],
                         guidance_scale=guidance[i], seed=p.seed, producer_rank=self.rank,
                         created_at=now, epoch=taken[i][0])
            for i in keep
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
