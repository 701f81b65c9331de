"""The replay buffer between producers and the trainer: bounded, reuse-capped, fresh-first."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from online_stablerep.records import CaptionGroup, TrainBatch

GroupKey = tuple[int, int, int]  # (caption_id, epoch, producer_rank)


def group_key(group: CaptionGroup) -> GroupKey:
    return (group.caption_id, group.epoch, group.producer_rank)


@dataclass
class _Slot:
    group: CaptionGroup
    uses: int = 0
    added_at: float = field(default_factory=time.time)
    order: int = 0


class ReplayBuffer:
    """Holds at most `capacity` caption groups; each is drawn at most `max_reuse` times.

    Sampling is fresh-first: eligible groups (uses < max_reuse) are ranked by uses, then by
    arrival, and a batch takes the first n with distinct caption ids. A group is dropped once
    it reaches max_reuse. When a new group arrives at a full buffer, the most-used group
    (oldest on ties) is evicted; `evicted_unused` counts groups evicted before any use, the only
    way a group that reached the buffer goes untrained.

    Thread-safe: a receiver thread adds while the training thread samples.
    """

    def __init__(self, capacity: int, max_reuse: int, seed: int = 0, track_keys: bool = False):
        if capacity < 1 or max_reuse < 1:
            raise ValueError("replay buffer needs capacity >= 1 and max_reuse >= 1")
        self.capacity = capacity
        self.max_reuse = max_reuse
        self._slots: list[_Slot] = []
        self._arrivals = 0
        self._lock = threading.Condition()
        self._closed = False
        self._generator = torch.Generator().manual_seed(seed)
        # Run-long accounting (also saved in checkpoints as statistics).
        self.groups_added = 0
        self.groups_drawn = 0
        self.draws = 0
        self.evicted_unused = 0
        self.last_batch_age_s = 0.0
        # Per-group use counts for tests and audits (off by default: grows with the run).
        self.uses_by_key: Counter[GroupKey] | None = Counter() if track_keys else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._slots)

    def unused_count(self) -> int:
        """Groups held that were never drawn (they bound how many more can be accepted)."""
        with self._lock:
            return sum(1 for s in self._slots if s.uses == 0)

    def add(self, groups: list[CaptionGroup]) -> None:
        """Insert groups, evicting the most-used ones when full; wakes a waiting sampler."""
        with self._lock:
            for group in groups:
                if len(self._slots) >= self.capacity:
                    victim = max(self._slots, key=lambda s: (s.uses, -s.order))
                    self._slots.remove(victim)
                    self.evicted_unused += int(victim.uses == 0)
                self._slots.append(_Slot(group=group, order=self._arrivals))
                self._arrivals += 1
                self.groups_added += 1
            self._lock.notify_all()

    def _eligible_distinct(self, n: int) -> list[_Slot]:
        chosen: list[_Slot] = []
        seen: set[int] = set()
        for slot in sorted(self._slots, key=lambda s: (s.uses, s.order)):
            if slot.uses < self.max_reuse and slot.group.caption_id not in seen:
                chosen.append(slot)
                seen.add(slot.group.caption_id)
                if len(chosen) == n:
                    break
        return chosen

    def ready(self, n: int) -> bool:
        with self._lock:
            return len(self._eligible_distinct(n)) == n

    def wait_ready(self, n: int, timeout: float) -> bool:
        """Block until n distinct eligible groups are held, the buffer closes, or timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not self._closed and len(self._eligible_distinct(n)) < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(remaining)
            return len(self._eligible_distinct(n)) == n

    def close(self) -> None:
        """Wake every waiter; later waits return at once."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def sample(self, n: int, k: int) -> TrainBatch | None:
        """Draw n distinct caption groups and k distinct views of each, or None if too few."""
        with self._lock:
            chosen = self._eligible_distinct(n)
            if len(chosen) < n:
                return None
            now = time.time()
            views = []
            for slot in chosen:
                images = slot.group.images_kchw
                if images.shape[0] < k:
                    raise ValueError(
                        f"caption group {slot.group.caption_id} from rank "
                        f"{slot.group.producer_rank} has {images.shape[0]} images, batch needs {k}"
                    )
                pick = torch.randperm(images.shape[0], generator=self._generator)[:k]
                views.append(images[pick])
                self.groups_drawn += int(slot.uses == 0)
                slot.uses += 1
                self.draws += 1
                if self.uses_by_key is not None:
                    self.uses_by_key[group_key(slot.group)] += 1
            self.last_batch_age_s = sum(now - s.group.created_at for s in chosen) / n
            self._slots = [s for s in self._slots if s.uses < self.max_reuse]
            # (n, k, 3, H, W) -> view-major (k * n, 3, H, W)
            images_nk = torch.stack(views)
            images = images_nk.transpose(0, 1).reshape(-1, *images_nk.shape[2:])
            ids = torch.tensor([s.group.caption_id for s in chosen], dtype=torch.int64)
            return TrainBatch(
                images=images,
                caption_ids=ids.repeat(k),
                captions=[s.group.caption for s in chosen],
                views_per_caption=k,
                captions_per_batch=n,
            )

    def stats(self) -> dict[str, float]:
        """Figures for the `buffer/` TensorBoard namespace."""
        with self._lock:
            held = len(self._slots)
            return {
                "groups": float(held),
                "mean_reuse": self.draws / self.groups_drawn if self.groups_drawn else 0.0,
                "age_s": self.last_batch_age_s,
                "unused": float(sum(1 for s in self._slots if s.uses == 0)),
                "evicted_unused": float(self.evicted_unused),
            }

    def counters(self) -> dict[str, int]:
        """Run-long counters saved with checkpoints."""
        with self._lock:
            return {
                "groups_added": self.groups_added,
                "groups_drawn": self.groups_drawn,
                "draws": self.draws,
                "evicted_unused": self.evicted_unused,
            }

    def state_dict(self, with_contents: bool) -> dict:
        """Counters and sampling RNG; the held groups too when `with_contents` (then a resumed
        run draws exactly the batches an uninterrupted one would)."""
        with self._lock:
            state = {"counters": self.counters(), "generator": self._generator.get_state(),
                     "arrivals": self._arrivals}
            if with_contents:
                state["slots"] = [(s.group, s.uses, s.added_at, s.order) for s in self._slots]
            return state

    def load_state_dict(self, state: dict) -> None:
        with self._lock:
            for key, value in state["counters"].items():
                setattr(self, key, int(value))
            self._generator.set_state(state["generator"])
            self._arrivals = int(state["arrivals"])
            if "slots" in state:
                self._slots = [
                    _Slot(group=g, uses=u, added_at=t, order=o) for g, u, t, o in state["slots"]
                ]
            self._lock.notify_all()
