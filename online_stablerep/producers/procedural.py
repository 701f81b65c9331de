"""The procedural producer: caption groups of fractal renders (fractals.py), cheap enough to feed
a CPU training run; it proves that the learning machinery works without Stable Diffusion.

Determinism: image j of category c in stream epoch e uses image index e*k + j and is a pure
function of (seed, c, index), so a group is the same on any rank and after a resume.
"""

from __future__ import annotations

import time
from typing import Any

from online_stablerep.config.schema import Config
from online_stablerep.fractals import caption_text, category_ifs, render_images
from online_stablerep.producers.stream import CaptionStream
from online_stablerep.records import CaptionGroup


class ProceduralProducer:
    """The Producer of fractal caption groups for one shard of the category stream."""

    def __init__(self, cfg: Config, shard: int, num_shards: int, rank: int = 0,
                 max_epochs: int = 0) -> None:
        """`max_epochs`: passes over the categories (the trainer's train.epochs; 0: no end)."""
        self.cfg = cfg
        self.rank = rank
        self.stream = CaptionStream(
            cfg.procedural.num_categories, shard, num_shards, cfg.producer.seed,
            shuffle=True, max_epochs=max_epochs,
        )

    def start(self) -> None:
        """Draw every category's IFS up front so the first call is not slower than the rest."""
        for c in range(self.stream.shard, self.stream.num_items, self.stream.num_shards):
            category_ifs(self.cfg.producer.seed, c, self.cfg.procedural.num_maps)

    def next_groups(self) -> list[CaptionGroup]:
        """The groups of `producer.captions_per_call` categories; [] when the stream ends."""
        p = self.cfg.producer
        k = p.images_per_caption
        pairs = self.stream.take(p.captions_per_call)
        if not pairs:
            return []
        categories = [c for _, c in pairs for _ in range(k)]
        indices = [epoch * k + j for epoch, _ in pairs for j in range(k)]
        images = render_images(self.cfg, categories, indices)  # (n * k, 3, S, S)
        now = time.time()
        return [
            CaptionGroup(
                caption_id=c,
                caption=caption_text(c),
                images_kchw=images[i * k : (i + 1) * k].clone(),
                guidance_scale=0.0,
                seed=p.seed,
                producer_rank=self.rank,
                created_at=now,
                epoch=epoch,
            )
            for i, (epoch, c) in enumerate(pairs)
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])

    def close(self) -> None:
        """Nothing to release: the producer holds no threads or devices."""
