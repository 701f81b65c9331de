"""Producers of caption groups, by name: `procedural` (fractals, cheap), `diffusion` and
`shards` (groups stored by an earlier run's `shards.write_dir`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from online_stablerep.config.schema import Config
from online_stablerep.producers.base import Producer


def _procedural(cfg: Config, shard: int, num_shards: int, rank: int,
                device: torch.device | str | None, max_epochs: int, min_images: int) -> Producer:
    # Procedural rendering runs on the CPU; the device is not used.
    from online_stablerep.producers.procedural import ProceduralProducer

    return ProceduralProducer(cfg, shard, num_shards, rank=rank, max_epochs=max_epochs)


def _diffusion(cfg: Config, shard: int, num_shards: int, rank: int,
               device: torch.device | str | None, max_epochs: int, min_images: int) -> Producer:
    # Imported lazily: diffusers and transformers take seconds to import.
    from online_stablerep.producers.diffusion import DiffusionProducer

    return DiffusionProducer(cfg, shard, num_shards, rank=rank, device=device,
                             max_epochs=max_epochs)


def _shards(cfg: Config, shard: int, num_shards: int, rank: int,
            device: torch.device | str | None, max_epochs: int, min_images: int) -> Producer:
    # Stored groups are decoded on the CPU; the device is not used.
    from online_stablerep.producers.shards import ShardsProducer

    return ShardsProducer(cfg, shard, num_shards, rank=rank, max_epochs=max_epochs,
                          min_images=min_images)


PRODUCERS: dict[str, Callable[..., Producer]] = {
    "procedural": _procedural,
    "diffusion": _diffusion,
    "shards": _shards,
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

    With `shards.write_dir` set, the producer is wrapped so that every group it makes is also
    written to shards (producers/shard_writing.py).
    """
    if cfg.producer.kind not in PRODUCERS:
        raise ValueError(
            f"producer.kind={cfg.producer.kind!r}: expected one of {', '.join(PRODUCERS)}"
        )
    # The two keys of the trainer a producer obeys, handed over here, so no producer reads them.
    producer = PRODUCERS[cfg.producer.kind](cfg, shard, num_shards, rank, device,
                                            cfg.train.epochs, cfg.batch.views_per_caption)
    x = cfg.shards
    if not x.write_dir:
        return producer
    from online_stablerep.producers.shard_writing import ShardWritingProducer
    from online_stablerep.shards.writer import ShardWriter

    writer = ShardWriter(x.write_dir, rank, x.image_format, x.quality, x.groups_per_shard,
                         x.queue_groups)
    return ShardWritingProducer(producer, writer)
