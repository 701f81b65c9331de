"""The producer interface used in-process by colocated trainers and by generator ranks."""

from __future__ import annotations

from typing import Any, Protocol

from online_stablerep.records import CaptionGroup


class Producer(Protocol):
    """Makes caption groups from its shard of the caption stream.

    `next_groups()` returns the groups of one batched call (`producer.captions_per_call`
    captions); an empty list means the stream is exhausted (`train.epochs` reached).
    `state_dict()` holds the caption cursor so a resumed job neither repeats nor skips.
    """

    def start(self) -> None: ...

    def next_groups(self) -> list[CaptionGroup]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...
