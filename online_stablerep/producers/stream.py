"""A sharded, per-epoch shuffled stream of caption ids with a resumable cursor."""

from __future__ import annotations

import numpy as np

from online_stablerep.producers.cursor import Epoch, EpochStream, Position


class CaptionStream(EpochStream[tuple[int, int]]):
    """Caption ids 0..num_items-1, split across `num_shards` producers without overlap or gap.

    Each epoch draws one permutation of all ids from (seed, epoch), identical on every rank;
    shard s takes positions s, s + P, s + 2P, ... of it. Only the shard's slice is kept
    (num_items / P int64 ids), so a 10M-caption corpus costs each of P ranks 80/P MB.
    Items are (epoch, caption id) pairs; the cursor is producers/cursor.py's.
    """

    def __init__(
        self,
        num_items: int,
        shard: int = 0,
        num_shards: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        max_epochs: int = 0,
    ) -> None:
        if num_items < 1:
            raise ValueError("caption stream is empty")
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} not in [0, {num_shards})")
        if num_items < num_shards:
            raise ValueError(
                f"{num_items} captions cannot be split across {num_shards} producers "
                "(each needs at least one)"
            )
        super().__init__("caption", {"num_items": num_items, "shard": shard,
                                     "num_shards": num_shards, "seed": seed},
                         "the same corpus, seed and layout", max_epochs)
        self.num_items = num_items
        self.shard = shard
        self.num_shards = num_shards
        self.seed = seed
        self.shuffle = shuffle

    def _epoch(self, epoch: int, start: Position) -> Epoch[tuple[int, int]]:
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
            order = np.ascontiguousarray(perm[self.shard :: self.num_shards])
        else:
            order = np.arange(self.shard, self.num_items, self.num_shards)
        for position in range(start[0], len(order)):
            yield (position + 1,), (epoch, int(order[position]))
