"""What the receiver fills: the trainer's replay buffer, seen only through the three calls the
transport makes, so the transport does not depend on the replay package."""

from __future__ import annotations

from typing import Any, Protocol

from online_stablerep.records import CaptionGroup


class GroupSink(Protocol):
    """Holds received caption groups (replay.ReplayBuffer is one)."""

    def add(self, groups: list[CaptionGroup]) -> None:
        """Take the groups of one DATA message."""
        ...

    def room(self) -> int:
        """Groups it can still take without evicting an unused one (bounds the credit)."""
        ...

    def state_dict(self, with_contents: bool) -> dict[str, Any]:
        """Its state for a checkpoint (the held groups too when `with_contents`)."""
        ...
