"""One resumable, rank-sharded cursor for every stream a rank reads epoch after epoch (caption ids:
producers/stream.py; stored groups: producers/shards.py; real images: training/real_images.py),
and one policy for samples that cannot be read.

Each epoch a rank reads its share of the items in an order drawn from (seed, epoch). The cursor
(epoch, position) names the next item: position counts what of this epoch's share was consumed,
handed out or skipped as unreadable, so a resumed run continues with the next item and reads
past the ones before it without decoding them. With `max_epochs` > 0 the stream ends after that
many epochs. A whole epoch read without one good item raises: the share is empty or unreadable,
and going on would loop forever.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from online_stablerep.monitoring.metrics import console

T = TypeVar("T")
# Where in an epoch's share the cursor stands: (position,) or, for files of samples,
# (file, sample).
Position = tuple[int, ...]


@dataclass
class Unreadable:
    """An item of an epoch that could not be read; its error names the file (and sample)."""

    error: Exception


# One epoch of a stream: (position after it, item or Unreadable) per item.
Epoch = Generator[tuple[Position, T | Unreadable], None, None]


class SkipBad:
    """What a stream does with an unreadable item: raise its error, or, when the config's
    `key` asks to skip, count it and log a line naming it."""

    def __init__(self, key: str, skip: bool, role: str, rank: int = 0) -> None:
        self.key, self.skip, self.role, self.rank = key, skip, role, rank
        self.skipped = 0

    def __call__(self, error: Exception) -> None:
        if not self.skip:
            raise error
        self.skipped += 1
        console(f"skipped ({self.skipped} so far, {self.key}=true): {error}", role=self.role,
                rank=self.rank)


class EpochStream(Generic[T]):
    """The cursor of a stream of epochs; a stream says how one epoch reads (`_epoch`).

    Args:
        what: the cursor's name in errors ("caption", "shards", "real images").
        layout: what must match on resume (corpus size, shard, number of shards, seed, ...),
            saved with the cursor.
        needs: what a resume needs, said when the layout differs ("the same corpus, seed and
            layout").
        max_epochs: epochs to read (0: no end).
        skip: the policy for unreadable items (None: the stream has none).
    """

    # Names of the position's parts in state_dict().
    position_keys: tuple[str, ...] = ("position",)

    def __init__(self, what: str, layout: dict[str, int], needs: str, max_epochs: int = 0,
                 skip: SkipBad | None = None) -> None:
        self.what, self.layout, self.needs = what, layout, needs
        self.max_epochs = max_epochs
        self.skip = skip
        self.epoch = 0
        self.position: Position = (0,) * len(self.position_keys)
        self._items: Epoch[T] | None = None
        # Whether this process reads the open epoch from its start, and whether it gave a good
        # item: a whole epoch without one means none is readable.
        self._whole = True
        self._good = False

    def _epoch(self, epoch: int, start: Position) -> Epoch[T]:
        """(position after it, item or Unreadable) of each item of `epoch`'s share from `start`
        on, reading past what comes before `start` without decoding it."""
        raise NotImplementedError

    def _empty_epoch(self) -> Exception:
        """The error of a whole epoch without one good item (streams say what to do about it)."""
        return ValueError(f"{self.what}: a whole epoch of this rank's share gave no item "
                          f"({self.skipped} skipped)")

    @property
    def exhausted(self) -> bool:
        return 0 < self.max_epochs <= self.epoch

    @property
    def skipped(self) -> int:
        """Unreadable items skipped so far."""
        return self.skip.skipped if self.skip is not None else 0

    @skipped.setter
    def skipped(self, count: int) -> None:
        assert self.skip is not None
        self.skip.skipped = count

    def take(self, count: int) -> list[T]:
        """Up to `count` items, crossing into the next epoch when one ends; fewer only when the
        stream is exhausted."""
        out: list[T] = []
        while len(out) < count and not self.exhausted:
            if self._items is None:
                self._items = self._epoch(self.epoch, self.position)
                self._whole, self._good = not any(self.position), False
            step = next(self._items, None)
            if step is None:
                self._items = None
                if self._whole and not self._good:
                    raise self._empty_epoch()
                self.epoch, self.position = self.epoch + 1, (0,) * len(self.position_keys)
                continue
            self.position, item = step
            if isinstance(item, Unreadable):
                if self.skip is None:
                    raise item.error
                self.skip(item.error)
                continue
            self._good = True
            out.append(item)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, **dict(zip(self.position_keys, self.position, strict=True)),
                **self.layout}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the cursor; the layout must match the saved one (a key the saved cursor does
        not hold predates it and is not compared)."""
        for key, have in self.layout.items():
            if key in state and state[key] != have:
                raise ValueError(
                    f"{self.what} cursor was saved with {key}={state[key]}, this run has "
                    f"{key}={have}: resume needs {self.needs}")
        self.close()
        self.epoch = int(state["epoch"])
        self.position = tuple(int(state[key]) for key in self.position_keys)

    def close(self) -> None:
        """Close the open epoch (and its file); a later take() reopens at the cursor."""
        if self._items is not None:
            self._items.close()
            self._items = None
