"""The replay buffer between producers and the trainer: bounded, reuse-capped, random draws
from a minimum pool, with figures of how well consecutive batches mix."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from online_stablerep.config.validate import BATCH_POSITIVES, REPLAY_DRAWS
from online_stablerep.records import CaptionGroup, TrainBatch

GroupKey = tuple[int, int, int]  # (caption_id, epoch, producer_rank)


def group_key(group: CaptionGroup) -> GroupKey:
    return (group.caption_id, group.epoch, group.producer_rank)


@dataclass(eq=False)  # identity: list.remove must not compare image tensors
class _Slot:
    group: CaptionGroup
    uses: int = 0
    added_at: float = field(default_factory=time.time)
    order: int = 0
    # Batch index of the first and last draw of this group (-1: never drawn).
    first_use: int = -1
    last_use: int = -1


class ReplayBuffer:
    """Holds at most `capacity` caption groups; each is drawn at most `max_reuse` times.

    A batch is n groups with distinct caption ids drawn at random, without replacement, from
    the pool of eligible groups (uses < max_reuse); an unused group weighs `fresh_weight` times
    a used one (1 = uniform). A draw waits until the pool holds `min_pool` groups, so batches
    do not repeat each other; `drain=True` lifts that at the end of the stream. A group is
    dropped once it reaches max_reuse. When a new group arrives at a full buffer, the most-used
    group (oldest on ties) is evicted; `evicted_unused` counts groups evicted before any use,
    the only way a group that reached the buffer goes untrained.

    Thread-safe: a receiver thread adds while the training thread samples.
    """

    def __init__(self, capacity: int, max_reuse: int, min_pool: int = 1,
                 fresh_weight: float = 1.0, seed: int = 0, track_keys: bool = False,
                 draw: str = "random", positives: str = "caption"):
        if capacity < 1 or max_reuse < 1:
            raise ValueError("replay buffer needs capacity >= 1 and max_reuse >= 1")
        if min_pool > capacity:
            raise ValueError(f"replay.min_pool ({min_pool}) exceeds replay.capacity ({capacity})")
        if fresh_weight <= 0:
            raise ValueError("replay.fresh_weight must be > 0")
        if draw not in REPLAY_DRAWS:
            raise ValueError(f"replay.draw must be one of {REPLAY_DRAWS}, got {draw!r}")
        if positives not in BATCH_POSITIVES:
            raise ValueError(f"batch.positives must be one of {BATCH_POSITIVES}, got {positives!r}")
        self.draw = draw
        self.positives = positives
        self.capacity = capacity
        self.max_reuse = max_reuse
        self.min_pool = min_pool
        self.fresh_weight = fresh_weight
        self._slots: list[_Slot] = []
        self._arrivals = 0
        self._lock = threading.Condition()
        self._closed = False
        self._generator = torch.Generator().manual_seed(seed)
        # Run-long accounting (also saved in checkpoints as statistics).
        self.groups_added = 0
        self.images_added = 0
        self.groups_drawn = 0
        self.draws = 0
        self.evicted_unused = 0
        self.last_batch_age_s = 0.0
        # How well batches mix: caption ids of the previous batch, the summed fraction of each
        # batch repeated from the one before, and first-to-last-use spreads of retired groups.
        self.batches = 0
        # Group keys of the newest batch (the overlap figure; audits record them).
        self.last_batch_keys: list[GroupKey] = []
        self.overlap_sum = 0.0
        self.spread_sum = 0
        self.retired_used = 0
        # Per-group use counts for tests and audits (off by default: grows with the run).
        self.uses_by_key: Counter[GroupKey] | None = Counter() if track_keys else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._slots)

    def room(self) -> int:
        """Groups the buffer can still accept without evicting one that was never used (the
        credit rule hands out at most this much, less what is already promised)."""
        with self._lock:
            return self.capacity - sum(1 for s in self._slots if s.uses == 0)

    def newest(self, count: int) -> list[CaptionGroup]:
        """The `count` most recently received groups held, newest first (for image grids)."""
        with self._lock:
            slots = sorted(self._slots, key=lambda s: -s.order)[:count]
            return [s.group for s in slots]

    def add(self, groups: list[CaptionGroup]) -> None:
        """Insert groups, evicting the most-used ones when full; wakes a waiting sampler."""
        with self._lock:
            for group in groups:
                if len(self._slots) >= self.capacity:
                    victim = max(self._slots, key=lambda s: (s.uses, -s.order))
                    self._slots.remove(victim)
                    self._retire(victim)
                    self.evicted_unused += int(victim.uses == 0)
                self._slots.append(_Slot(group=group, order=self._arrivals))
                self._arrivals += 1
                self.groups_added += 1
                self.images_added += group.num_images
            self._lock.notify_all()

    def _retire(self, slot: _Slot) -> None:
        if slot.uses > 0:
            self.spread_sum += slot.last_use - slot.first_use
            self.retired_used += 1

    def _distinct_captions(self) -> int:
        return len({s.group.caption_id for s in self._slots})

    def _ready(self, n: int, drain: bool) -> bool:
        # Every held slot is eligible: slots leave the buffer when they reach max_reuse.
        enough = drain or len(self._slots) >= self.min_pool
        return enough and self._distinct_captions() >= n

    def _order(self) -> list[int]:
        """Slot indices in draw order. random: weighted without replacement (an exponential
        race: slot i finishes at Exp(1) / w_i, the first finishers win). sequential (the old
        rule, kept for the reuse experiment): unused first, then least used, oldest first."""
        if self.draw == "sequential":
            return sorted(range(len(self._slots)),
                          key=lambda i: (self._slots[i].uses, self._slots[i].order))
        weights = torch.tensor(
            [self.fresh_weight if s.uses == 0 else 1.0 for s in self._slots], dtype=torch.float64
        )
        finish = torch.empty(len(self._slots), dtype=torch.float64).exponential_(
            generator=self._generator) / weights
        return torch.argsort(finish).tolist()

    def _draw(self, n: int) -> list[_Slot]:
        """n slots with distinct caption ids, in draw order."""
        chosen: list[_Slot] = []
        seen: set[int] = set()
        for i in self._order():
            slot = self._slots[i]
            if slot.group.caption_id not in seen:
                chosen.append(slot)
                seen.add(slot.group.caption_id)
                if len(chosen) == n:
                    break
        return chosen

    def ready(self, n: int, drain: bool = False) -> bool:
        """Whether a batch of n can be drawn now (`drain`: ignore min_pool)."""
        with self._lock:
            return self._ready(n, drain)

    def wait_ready(self, n: int, timeout: float) -> bool:
        """Block until a batch of n can be drawn, the buffer closes, or timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not self._closed and not self._ready(n, drain=False):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(remaining)
            return self._ready(n, drain=False)

    def close(self) -> None:
        """Wake every waiter; later waits return at once."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def sample(self, n: int, k: int, drain: bool = False) -> TrainBatch | None:
        """Draw n distinct caption groups and k distinct views of each, or None when the pool
        is below min_pool (or, with `drain`, holds fewer than n distinct captions)."""
        with self._lock:
            if not self._ready(n, drain):
                return None
            chosen = self._draw(n)
            now = time.time()
            views = []
            for slot in chosen:
                images = slot.group.images_kchw
                if self.positives == "image":
                    one = torch.randint(images.shape[0], (1,), generator=self._generator)
                    pick = one.expand(k)
                elif images.shape[0] < k:
                    raise ValueError(
                        f"caption group {slot.group.caption_id} from rank "
                        f"{slot.group.producer_rank} has {images.shape[0]} images, batch needs {k}"
                    )
                else:
                    pick = torch.randperm(images.shape[0], generator=self._generator)[:k]
                views.append(images[pick])
                self.groups_drawn += int(slot.uses == 0)
                if slot.uses == 0:
                    slot.first_use = self.batches
                slot.last_use = self.batches
                slot.uses += 1
                self.draws += 1
                if self.uses_by_key is not None:
                    self.uses_by_key[group_key(slot.group)] += 1
            ids = [s.group.caption_id for s in chosen]
            # Overlap counts groups (the same images), not caption ids: a small corpus repeats
            # its captions every epoch in new groups, which is not a repeated batch.
            keys = [group_key(s.group) for s in chosen]
            if self.batches > 0:
                self.overlap_sum += len(set(keys) & set(self.last_batch_keys)) / n
            self.last_batch_keys = keys
            self.batches += 1
            self.last_batch_age_s = sum(now - s.group.created_at for s in chosen) / n
            for slot in self._slots:
                if slot.uses >= self.max_reuse:
                    self._retire(slot)
            self._slots = [s for s in self._slots if s.uses < self.max_reuse]
            # (n, k, 3, H, W) -> view-major (k * n, 3, H, W)
            images_nk = torch.stack(views)
            images = images_nk.transpose(0, 1).reshape(-1, *images_nk.shape[2:])
            return TrainBatch(
                images=images,
                caption_ids=torch.tensor(ids, dtype=torch.int64).repeat(k),
                captions=[s.group.caption for s in chosen],
                views_per_caption=k,
                captions_per_batch=n,
            )

    def stats(self) -> dict[str, float]:
        """Figures for the `buffer/` TensorBoard namespace. `batch_overlap` is the mean
        fraction of a batch's caption groups that were in the previous batch, `use_spread_steps`
        the mean steps between a retired group's first and last use (run means)."""
        with self._lock:
            return {
                "groups": float(len(self._slots)),
                "mean_reuse": self.draws / self.groups_drawn if self.groups_drawn else 0.0,
                "age_s": self.last_batch_age_s,
                "unused": float(sum(1 for s in self._slots if s.uses == 0)),
                "evicted_unused": float(self.evicted_unused),
                "batch_overlap": self.overlap_sum / max(self.batches - 1, 1),
                "use_spread_steps": self.spread_sum / max(self.retired_used, 1),
            }

    def counters(self) -> dict[str, int]:
        """Run-long counters saved with checkpoints."""
        with self._lock:
            return {
                "groups_added": self.groups_added,
                "images_added": self.images_added,
                "groups_drawn": self.groups_drawn,
                "draws": self.draws,
                "evicted_unused": self.evicted_unused,
                "batches": self.batches,
                "spread_sum": self.spread_sum,
                "retired_used": self.retired_used,
            }

    def state_dict(self, with_contents: bool) -> dict:
        """Counters and sampling RNG; the held groups too when `with_contents` (then a resumed
        run draws exactly the batches an uninterrupted one would)."""
        with self._lock:
            state = {"counters": self.counters(), "generator": self._generator.get_state(),
                     "arrivals": self._arrivals, "overlap_sum": self.overlap_sum,
                     "previous_keys": list(self.last_batch_keys)}
            if with_contents:
                state["slots"] = [(s.group, s.uses, s.added_at, s.order, s.first_use, s.last_use)
                                  for s in self._slots]
            return state

    def load_state_dict(self, state: dict) -> None:
        with self._lock:
            for key, value in state["counters"].items():
                setattr(self, key, int(value))
            self._generator.set_state(state["generator"])
            self._arrivals = int(state["arrivals"])
            self.overlap_sum = float(state.get("overlap_sum", 0.0))
            self.last_batch_keys = [tuple(k) for k in state.get("previous_keys", [])]
            if "slots" in state:
                self._slots = [_Slot(*fields) for fields in state["slots"]]
            self._lock.notify_all()
