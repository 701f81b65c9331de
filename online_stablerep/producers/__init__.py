"""Producers of caption groups, by name: `procedural` (fractals, cheap) and `diffusion`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from online_stablerep.config.schema import Config
from online_stablerep.producers.base import Producer


def _procedural(cfg: Config, shard: int, num_shards: int, rank: int,
                device: torch.device | str | None) -> Producer:
    # Procedural rendering runs on the CPU; the device is not used.
    from online_stablerep.producers.procedural import ProceduralProducer

    return ProceduralProducer(cfg, shard, num_shards, rank=rank)


def _diffusion(cfg: Config, shard: int, num_shards: int, rank: int,
               device: torch.device | str | None) -> Producer:
    # Imported lazily: diffusers and transformers take seconds to import.
    from online_stablerep.producers.diffusion import DiffusionProducer

    return DiffusionProducer(cfg, shard, num_shards, rank=rank, device=device)


PRODUCERS: dict[str, Callable[..., Producer]] = {
    "procedural": _procedural,
    "diffusion": _diffusion,
}


def build_producer(cfg: Config, shard: int, num_shards: int, rank: int = 0,
                   device: torch.device | str | None = None) -> Producer:
    """The producer named by `cfg.producer.kind` for caption shard `shard` of `num_shards`.

    Args:
        cfg: The validated config.
        shard: This producer's caption shard.
        num_shards: Producers sharing the caption corpus.
        rank: Global rank recorded in the groups it makes.
        device: Where the diffusion model runs (None: the local GPU if any, else the CPU).
    """
    if cfg.producer.kind not in PRODUCERS:
        raise ValueError(
            f"producer.kind={cfg.producer.kind!r}: expected one of {', '.join(PRODUCERS)}"
        )
    return PRODUCERS[cfg.producer.kind](cfg, shard, num_shards, rank, device)
