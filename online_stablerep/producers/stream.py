"""A sharded, per-epoch shuffled stream of caption ids with a resumable cursor."""

from __future__ import annotations

from typing import Any

import numpy as np


class CaptionStream:
    """Caption ids 0..num_items-1, split across `num_shards` producers without overlap or gap.

    Each epoch draws one permutation of all ids from (seed, epoch), identical on every rank;
    shard s takes positions s, s + P, s + 2P, ... of it. Only the shard's slice is kept
    (num_items / P int64 ids), so a 10M-caption corpus costs each of P ranks 80/P MB.
    The cursor (epoch, position) names the next id to hand out.
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
        self.num_items = num_items
        self.shard = shard
        self.num_shards = num_shards
        self.seed = seed
        self.shuffle = shuffle
        self.max_epochs = max_epochs
        self.epoch = 0
        self.position = 0
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items)
                self._order = np.ascontiguousarray(perm[self.shard :: self.num_shards])
            else:
                self._order = np.arange(self.shard, self.num_items, self.num_shards)
            self._order_epoch = self.epoch
        assert self._order is not None
        return self._order

    @property
    def exhausted(self) -> bool:
        return self.max_epochs > 0 and self.epoch >= self.max_epochs

    def take(self, count: int) -> list[tuple[int, int]]:
        """Up to `count` (epoch, caption_id) pairs; fewer only when the stream is exhausted."""
        out: list[tuple[int, int]] = []
        while len(out) < count and not self.exhausted:
            order = self._epoch_order()
            if self.position >= len(order):
                self.epoch += 1
                self.position = 0
                continue
            end = min(len(order), self.position + count - len(out))
            out.extend((self.epoch, int(c)) for c in order[self.position : end])
            self.position = end
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_items": self.num_items,
            "shard": self.shard,
            "num_shards": self.num_shards,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the cursor; the corpus and sharding must match the saved ones."""
        for key in ("num_items", "shard", "num_shards", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"caption cursor was saved with {key}={state[key]}, this run has "
                    f"{key}={getattr(self, key)}: resume needs the same corpus, seed and layout"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
