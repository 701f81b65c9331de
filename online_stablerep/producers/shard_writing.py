"""A producer decorator that also writes every group it makes to WebDataset shards
(`shards.write_dir`), on colocated trainers and generator ranks alike.

The cursor it reports covers only what is safely on disk. Groups still queued for the writer
when a checkpoint records the cursor would otherwise be lost by a crash: the cursor says they
were made, so a resumed producer never makes them again. So `state_dict()` holds the wrapped
producer's cursor (what the trainer has received: unchanged meaning) plus `unwritten`: the cursor
before the oldest call whose groups are not all written, and how many calls followed it. On
resume the wrapper first replays those calls, writing the groups the shards lack (the rest are
skipped by key) and handing none of them out, which lands it exactly at the saved cursor. A
replay is bounded by the writer's queue (`shards.queue_groups`). In hybrid mode this state
travels in the generator's cursor records and is saved in the trainers' checkpoints, so the
same holds there.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from online_stablerep.monitoring.metrics import console
from online_stablerep.producers.base import Producer
from online_stablerep.records import CaptionGroup
from online_stablerep.shards.writer import ShardWriteError, ShardWriter


class ShardWritingProducer:
    """Makes groups with `inner` and queues each one for `writer`."""

    def __init__(self, inner: Producer, writer: ShardWriter) -> None:
        self.inner = inner
        self.writer = writer
        # (cursor before the call, sequence number of its last queued group), oldest first,
        # for calls whose groups may not all be written yet.
        self._calls: deque[tuple[dict[str, Any], int]] = deque()
        self._last_seq = 0
        # After load_state_dict: (calls to replay, the cursor they must end at).
        self._replay: tuple[int, dict[str, Any]] | None = None
        if writer.keys:
            console(f"shards in {writer.directory}: {len(writer.keys)} groups of rank "
                    f"{writer.rank} already written ({writer.recovered} recovered from an "
                    "unfinished shard); those are not written again", role="shards", rank=writer.rank)

    def start(self) -> None:
        self.inner.start()

    def _make(self) -> list[CaptionGroup]:
        before = self.inner.state_dict()
        groups = self.inner.next_groups()
        for group in groups:
            seq = self.writer.put(group)
            if seq is not None:
                self._last_seq = seq
        self._calls.append((before, self._last_seq))
        self._forget_written()
        return groups

    def _forget_written(self) -> None:
        """Drop the calls whose groups are all written (bounds memory between checkpoints)."""
        durable = self.writer.durable
        while self._calls and self._calls[0][1] <= durable:
            self._calls.popleft()

    def next_groups(self) -> list[CaptionGroup]:
        """The wrapped producer's next groups, each queued for writing.

        Raises:
            ShardWriteError: the writer failed (a full disk, a bad folder), naming the file.
        """
        self.writer.check()
        if self._replay is not None:
            calls, target = self._replay
            for _ in range(calls):
                self._make()
            if self.inner.state_dict() != target:
                raise ShardWriteError(
                    f"replaying {calls} producer calls to rewrite groups missing from "
                    f"{self.writer.directory} did not reach the saved cursor: the producer is "
                    "not deterministic, or its config changed since the checkpoint")
            self._replay = None
        return self._make()

    def state_dict(self) -> dict[str, Any]:
        if self._replay is not None:
            calls, target = self._replay
            return {**target, "unwritten": {"replay_from": self.inner.state_dict(),
                                            "calls": calls}}
        self._forget_written()
        unwritten = ({"replay_from": self._calls[0][0], "calls": len(self._calls)} if self._calls
                     else None)
        return {**self.inner.state_dict(), "unwritten": unwritten}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the cursor; a cursor saved without writing shards (no `unwritten`) is taken
        as is. Checkpoints written before the rename name `unwritten` "spill"."""
        target = {key: value for key, value in state.items() if key not in ("unwritten", "spill")}
        unwritten = state.get("unwritten", state.get("spill"))
        self._calls.clear()
        if unwritten is None:
            self.inner.load_state_dict(target)
            self._replay = None
        else:
            self.inner.load_state_dict(unwritten["replay_from"])
            self._replay = (int(unwritten["calls"]), target)

    def close(self) -> None:
        """Close the wrapped producer, then write what is queued and complete the last shard."""
        try:
            self.inner.close()
        finally:
            self.writer.close()
