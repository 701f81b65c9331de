"""Where a trainer's batches come from: a replay buffer filled in-process (colocated) or by a
receiver thread (hybrid). The Trainer sees only the BatchSource interface."""

from __future__ import annotations

import time
from typing import Any, Protocol

from online_stablerep.producers.base import Producer
from online_stablerep.records import TrainBatch
from online_stablerep.replay import ReplayBuffer


class BatchSource(Protocol):
    """Batches of n caption groups x k views for one trainer rank."""

    # The buffer batches are drawn from (statistics, grids of received groups).
    buffer: ReplayBuffer

    def next_batch(self) -> TrainBatch | None:
        """The next batch, or None when the caption stream has ended (train.epochs)."""
        ...

    def idle_seconds(self) -> float:
        """Seconds spent waiting for groups so far (the trainer's idle time)."""
        ...

    def metrics(self) -> dict[str, float]:
        """Extra scalars to log, tag -> value (e.g. `gen/images_per_s`)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Producer cursors to checkpoint (every generator's, in hybrid mode)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def snapshot(self, buffer_contents: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        """(buffer state, state_dict()) as one consistent snapshot for a checkpoint."""
        ...

    def close(self) -> None: ...


class ColocatedSource:
    """Runs the producer in the trainer's process whenever the buffer's pool is below its
    minimum, so every batch is drawn from a full pool; at the end of the caption stream
    (train.epochs) the pool drains."""

    def __init__(self, producer: Producer, buffer: ReplayBuffer, n: int, k: int) -> None:
        self.producer = producer
        self.buffer = buffer
        self.n = n
        self.k = k
        self._produce_s = 0.0
        self._images = 0
        self._exhausted = False

    def next_batch(self) -> TrainBatch | None:
        while not self.buffer.ready(self.n):
            if self._exhausted:
                return self.buffer.sample(self.n, self.k, drain=True)
            start = time.perf_counter()
            groups = self.producer.next_groups()
            self._produce_s += time.perf_counter() - start
            if not groups:
                self._exhausted = True
                continue
            self._images += sum(g.num_images for g in groups)
            self.buffer.add(groups)
        return self.buffer.sample(self.n, self.k)

    def idle_seconds(self) -> float:
        # In-process generation is the colocated trainer's only wait.
        return self._produce_s

    def metrics(self) -> dict[str, float]:
        rate = self._images / self._produce_s if self._produce_s > 0 else 0.0
        return {"gen/images_per_s": rate}

    def state_dict(self) -> dict[str, Any]:
        return {"producer": self.producer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.producer.load_state_dict(state["producer"])

    def snapshot(self, buffer_contents: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        # One thread fills the buffer and advances the producer: any moment is consistent.
        return self.buffer.state_dict(buffer_contents), self.state_dict()

    def close(self) -> None:
        self.producer.close()
        self.buffer.close()
