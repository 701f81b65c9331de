"""The BatchSource of a trainer rank in the hybrid job: batches from a replay buffer that a
receiver thread fills with caption groups sent by generator ranks."""

from __future__ import annotations

import threading
import time
from typing import Any

from online_stablerep.config.schema import Config
from online_stablerep.distributed.groups import JobGroups
from online_stablerep.monitoring.metrics import console
from online_stablerep.records import TrainBatch
from online_stablerep.replay import ReplayBuffer
from online_stablerep.transport.messages import TransportError
from online_stablerep.transport.receiver import Receiver

# How often a waiting trainer checks for a transport error (seconds).
_POLL_S = 0.2


class HybridSource:
    """Batches of n caption groups x k views from groups received from generator ranks.

    The receiver starts on the first `next_batch` (or `load_state_dict`), so a resumed job
    tells generators where to continue before any credit is granted.

    Args:
        buffer: the replay buffer the receiver fills.
        receiver: the (not yet started) receiver of this trainer rank.
        n: caption groups per batch.
        k: views per caption group.
        timeout_s: a batch wait with no new group for this long fails with a TransportError.
        startup_timeout_s: the same while some generator is still warming up.
        max_idle_after_loss: once a generator was lost (roles.on_generator_loss=continue), the
            trainer fails when it waited more than this share of the time since the loss
            (measured over at least `timeout_s`): too few generators are left to feed it.
    """

    def __init__(
        self, buffer: ReplayBuffer, receiver: Receiver, n: int, k: int, timeout_s: float,
        startup_timeout_s: float | None = None, stop: threading.Event | None = None,
        max_idle_after_loss: float = 1.0,
    ) -> None:
        self.buffer = buffer
        # Set by SIGTERM/SIGINT: a waiting next_batch returns None so the trainer can stop.
        self.stop = stop
        self.receiver = receiver
        self.n = n
        self.k = k
        self.timeout_s = timeout_s
        self.startup_timeout_s = max(startup_timeout_s or timeout_s, timeout_s)
        self._idle_s = 0.0
        self.max_idle_after_loss = max_idle_after_loss
        self._idle_at_loss: float | None = None  # idle seconds when the first loss was seen

    def _check(self) -> None:
        if self.receiver.error is not None:
            raise self.receiver.error
        lost_at = self.receiver.first_loss_at
        if lost_at is None:
            return
        if self._idle_at_loss is None:
            self._idle_at_loss = self._idle_s
        since = time.monotonic() - lost_at
        idle = self._idle_s - self._idle_at_loss
        if since >= self.timeout_s and idle / since > self.max_idle_after_loss:
            raise TransportError(
                f"trainer rank {self.receiver.rank}: idle {idle / since:.0%} of the {since:.0f} s "
                f"since generator ranks {sorted(self.receiver.lost)} were lost, above "
                f"roles.max_idle_after_loss={self.max_idle_after_loss:g}: too few generators "
                "left to feed the trainers"
            )

    def next_batch(self) -> TrainBatch | None:
        """The next batch; None once every generator ended and the buffer cannot fill one.

        Raises:
            TransportError: a generator failed or went silent, or no group arrived for
                `timeout_s` while the trainer waited (names the generators that hold credit).
        """
        if not self.receiver.started:
            self.receiver.start()
        start = time.monotonic()
        try:
            while True:
                self._check()
                if self.stop is not None and self.stop.is_set():
                    return None
                batch = self.buffer.sample(self.n, self.k)
                if batch is not None:
                    self.receiver.notify_room()
                    return batch
                if self.receiver.all_generators_ended:
                    # END follows a generator's last data, so nothing more can arrive: the
                    # pool drains below its minimum.
                    self._check()
                    return self.buffer.sample(self.n, self.k, drain=True)
                self.buffer.wait_ready(self.n, _POLL_S)
                silent_s = time.monotonic() - max(start, self.receiver.last_arrival)
                warming = self.receiver.warming()
                budget = self.startup_timeout_s if warming else self.timeout_s
                if silent_s > budget:
                    held = {g: c for g, c in self.receiver.outstanding().items() if c}
                    raise TransportError(
                        f"trainer rank {self.receiver.rank}: waited {silent_s:.0f} s for a batch "
                        f"of {self.n} caption groups with no group arriving (buffer holds "
                        f"{len(self.buffer)}; generator ranks holding credit: {held or 'none'}; "
                        f"warming up: {warming or 'none'}; "
                        f"{'transport.startup_timeout_s' if warming else 'transport.timeout_s'})"
                    )
        finally:
            self._idle_s += time.monotonic() - start

    def idle_seconds(self) -> float:
        return self._idle_s

    def metrics(self) -> dict[str, float]:
        return self.receiver.metrics()

    def state_dict(self) -> dict[str, Any]:
        """Per generator rank, the cursor record after the last group this trainer received
        (generators merge every trainer's records on resume and take the newest)."""
        return {"cursors": {str(g): c for g, c in self.receiver.cursors().items()}}

    def snapshot(self, buffer_contents: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        """(buffer state, state_dict()) taken under the receiver's lock: no group can arrive
        between the two, so the cursors never count a group the buffer state lacks."""
        buffer_state, cursors = self.receiver.snapshot(buffer_contents)
        return buffer_state, {"cursors": {str(g): c for g, c in cursors.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Start the receiver with RESUME records, so generators continue their streams."""
        cursors = {int(g): c for g, c in state["cursors"].items()}
        unknown = sorted(set(cursors) - set(self.receiver.generators))
        if unknown:
            raise ValueError(
                f"checkpoint holds caption cursors of generator ranks {unknown}, this job has "
                f"generator ranks {self.receiver.generators}: resume needs the same "
                "roles.generators and world size"
            )
        self.receiver.start(resume=cursors)

    def abort(self, reason: str) -> None:
        """Stop every generator with a failure reason (they exit non-zero)."""
        self.receiver.stop(reason=reason)
        self.buffer.close()

    def close(self) -> None:
        """STOP to every generator: clean (they answer END and exit 0) unless the transport
        failed, in which case the error is the abort reason (they exit non-zero)."""
        error = self.receiver.error
        self.receiver.stop(reason=None if error is None else str(error))
        self.buffer.close()
        counts = self.receiver.counters()["groups"]
        console(f"received {sum(counts.values())} groups in all ({counts} by generator rank; "
                f"{self.buffer.counters()['evicted_unused']} evicted unused)",
                rank=self.receiver.rank)


def build_hybrid_source(
    cfg: Config, groups: JobGroups, buffer: ReplayBuffer, stop: threading.Event | None = None,
    n: int | None = None,
) -> HybridSource:
    """The HybridSource of this trainer rank, from `transport.*` and `batch.*`; `n` generated
    groups per batch (default batch.captions_per_batch)."""
    t = cfg.transport
    receiver = Receiver(groups, buffer, t.credits_per_generator, t.timeout_s, t.startup_timeout_s,
                        on_loss=cfg.roles.on_generator_loss)
    return HybridSource(buffer, receiver, n or cfg.batch.captions_per_batch,
                        cfg.batch.views_per_caption, t.timeout_s, t.startup_timeout_s, stop,
                        max_idle_after_loss=cfg.roles.max_idle_after_loss)
