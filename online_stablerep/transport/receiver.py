"""The trainer side of the transport: credits out, caption groups in, on background threads.

Two threads, one per gloo group, so no group is ever driven by two threads at once:
- the receive thread takes messages from any generator on the data plane, unpacks DATA into
  the replay buffer and handles END and FAIL;
- the control thread sends START/RESUME once, then CREDIT whenever the buffer has room,
  KEEPALIVE when it has nothing else to say, and STOP at the end; it also watches that every
  generator still answers.

Credit rule: a trainer never has more groups promised than its buffer can take without
evicting an unused one: unused groups held + credit outstanding <= replay capacity.

What to send and when a generator is lost is decided by transport.protocol (`control_step`,
`loss_verdict`); the threads here do the gloo I/O and apply those decisions under one lock.
With `on_loss="continue"` (roles.on_generator_loss) a generator that dies, falls silent or
fails is named on the console and dropped, and the trainer goes on with the others until none
is left.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from typing import Any

from online_stablerep.distributed.groups import JobGroups
from online_stablerep.monitoring.metrics import console
from online_stablerep.transport import messages as msg
from online_stablerep.transport import protocol as proto
from online_stablerep.transport.messages import Kind, TransportError
from online_stablerep.transport.protocol import Cursor, GenState
from online_stablerep.transport.sink import GroupSink
from online_stablerep.transport.wire import unpack_groups

# Seconds between retries of a failed receive from any generator (on_loss="continue").
_RETRY_S = 0.2


def rate_vs_peers(rates: dict[int, float]) -> dict[int, float]:
    """Each generator's rate over the median of its peers' rates (generators without peers, or
    whose peers make nothing, are left out)."""
    shares = {}
    for g, rate in rates.items():
        peers = [r for h, r in rates.items() if h != g]
        if peers and statistics.median(peers) > 0:
            shares[g] = rate / statistics.median(peers)
    return shares


class Receiver:
    """Feeds one trainer rank's replay buffer from every generator rank.

    Args:
        groups: this rank's process groups (data_plane and control are used).
        buffer: the replay buffer to fill.
        credits_per_generator: most groups promised to one generator at a time.
        timeout_s: a generator silent this long (no data, no keepalive) fails the trainer.
        startup_timeout_s: a generator still warming up this long after the start fails the
            trainer (default: timeout_s).
        on_loss: "stop" (a lost or failed generator fails the trainer) or "continue" (it is
            dropped; only the loss of the last one fails the trainer).
    """

    # A generator making images at less than this share of its peers' median rate is named a
    # straggler.
    STRAGGLER_SHARE = 0.5

    def __init__(
        self, groups: JobGroups, buffer: GroupSink, credits_per_generator: int,
        timeout_s: float, startup_timeout_s: float | None = None, on_loss: str = "stop",
    ) -> None:
        assert groups.data_plane is not None and groups.control is not None
        self.groups = groups
        self.rank = groups.rank
        self.buffer = buffer
        self.credits_per_generator = credits_per_generator
        self.timeout_s = timeout_s
        self.startup_timeout_s = max(startup_timeout_s or timeout_s, timeout_s)
        self.on_loss = on_loss
        self.generators = groups.roles.generator_ranks
        # Console lines about lost generators and stragglers come from one trainer only.
        self._speaks = self.rank == groups.roles.trainer_ranks[0]
        # Generator rank -> why it was lost (on_loss="continue": the trainer went on), and when
        # the first was lost (HybridSource measures the idle time since then).
        self.lost: dict[int, str] = {}
        self.first_loss_at: float | None = None
        self._stragglers: list[int] = []
        # Generators on this trainer's node get credit first (K/node layouts).
        self.preferred = groups.roles.preferred_generators(self.rank)
        self.error: TransportError | None = None
        # One lock for everything below; the replay buffer is only ever filled under it, so a
        # snapshot taken under it (snapshot()) holds exactly the groups its cursors count.
        self._cond = threading.Condition()
        self._state = dict.fromkeys(self.generators, GenState.WARMING)
        self._outstanding = dict.fromkeys(self.generators, 0)
        self._last_seen = dict.fromkeys(self.generators, time.monotonic())
        self._started_at = time.monotonic()
        self._stop_reason: str | None = None
        self._stopping = False
        self._stop_called = False
        self._cursors: dict[int, Cursor] = {}
        self._resume: dict[int, Cursor] = {}
        # Run-long counters per generator rank; gen stats as last reported by each generator.
        self._groups = dict.fromkeys(self.generators, 0)
        self._images = dict.fromkeys(self.generators, 0)
        self._bytes = 0
        self._idle_fraction: dict[int, float] = {}
        self._made_rate: dict[int, float] = {}
        # Groups each generator skipped after a recoverable error, as it last reported.
        self._skipped: dict[int, int] = {}
        self._window = (time.monotonic(), 0, dict.fromkeys(self.generators, 0))
        self.last_arrival = time.monotonic()
        self._threads: list[threading.Thread] = []

    # ---- lifecycle ---------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return bool(self._threads)

    def start(self, resume: dict[int, dict[str, Any]] | None = None) -> None:
        """Start both threads; `resume` maps generator rank -> cursor record to continue from."""
        assert not self.started
        self._resume = {g: Cursor.from_dict(c) for g, c in (resume or {}).items()}
        self._cursors = dict(self._resume)
        now = time.monotonic()
        self._started_at = now
        self._last_seen = dict.fromkeys(self.generators, now)
        self._window = (now, 0, dict.fromkeys(self.generators, 0))
        self.last_arrival = now
        for target, name in ((self._receive_loop, "receive"), (self._control_loop, "control")):
            thread = threading.Thread(target=target, name=f"transport-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, reason: str | None = None) -> None:
        """Send STOP to every generator (a failure reason makes them exit non-zero) and wait
        until each has answered END or FAIL, at most `timeout_s`. Only the first call acts."""
        if self._stop_called:
            return
        self._stop_called = True
        if not self.started:
            # Generators still wait for their hello: tell them directly, nothing is in flight.
            for g in self.generators:
                self._send(g, Kind.STOP, blob=(reason or "").encode())
            return
        with self._cond:
            self._stopping = True
            self._stop_reason = reason
            self._cond.notify_all()
        # After a clean STOP every generator answers END, which ends the receive thread; after
        # an abort they exit at once, so only the control thread is joined.
        threads = self._threads if reason is None else self._threads[1:]
        for thread in threads:
            thread.join(timeout=self.timeout_s)

    def notify_room(self) -> None:
        """Wake the control thread: the trainer drew a batch, the buffer may have room."""
        with self._cond:
            self._cond.notify_all()

    @property
    def all_generators_ended(self) -> bool:
        with self._cond:
            return all(s in proto.FINISHED for s in self._state.values())

    def warming(self) -> list[int]:
        """Generator ranks still warming up (building or compiling their model)."""
        with self._cond:
            return [g for g, s in self._state.items() if s == GenState.WARMING]

    def states(self) -> dict[int, GenState]:
        with self._cond:
            return dict(self._state)

    def snapshot(self, buffer_contents: bool) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
        """(replay buffer state, cursor records) taken together under the receiver's lock, so
        every group the cursors count as delivered is in the buffer state."""
        with self._cond:
            return (self.buffer.state_dict(buffer_contents),
                    {g: c.to_dict() for g, c in self._cursors.items()})

    def _fail(self, text: str) -> None:
        with self._cond:
            if self.error is None:
                self.error = TransportError(f"trainer rank {self.rank}: {text}")
            self._cond.notify_all()

    def _lose(self, lost: list[tuple[int, str]]) -> None:
        """Generators newly gone (lost, or FAIL received), each with why: under "stop" the
        first fails the trainer; under "continue" each is named and dropped, and only the loss
        of the last generator fails the trainer."""
        with self._cond:  # one lock section: a reader never sees the states without the error
            lost = [(g, text) for g, text in lost if g not in self.lost]  # named once
            if not lost:
                return
            for g, _ in lost:
                if self._state[g] not in proto.GONE:
                    self._state[g] = proto.gen_lost(self._state[g])
            verdict = proto.loss_verdict(self.generators, self.on_loss, [g for g, _ in lost],
                                         set(self.lost) | {g for g, _ in lost})
            if verdict is None:
                self._record_loss(lost)
            else:
                self._fail("; ".join([lost[0][1]] + [verdict] * bool(verdict)))

    def _record_loss(self, lost: list[tuple[int, str]]) -> None:
        """Under the lock: name each lost generator and what it does to the balance."""
        now = time.monotonic()
        self.first_loss_at = self.first_loss_at or now
        total = sum(self._images.values()) or 1
        left = [g for g, s in self._state.items()
                if s not in proto.GONE and g not in self.lost and g not in dict(lost)]
        for g, text in lost:
            self.lost[g] = text
            self._outstanding[g] = 0
            if self._speaks:
                console(f"generator rank {g} lost ({text}); going on with {len(left)} of "
                        f"{len(self.generators)} generators (roles.on_generator_loss=continue): "
                        f"it made {self._images[g] / total:.0%} of the images received so "
                        "far, so generation falls by about that much", rank=self.rank)
        self._cond.notify_all()

    # ---- receive thread ----------------------------------------------------------------------

    def _receive_loop(self) -> None:
        group, timeout = self.groups.data_plane, self.timeout_s
        failing_since: float | None = None
        while True:
            with self._cond:
                live = [g for g, s in self._state.items() if s in proto.LISTENING]
            if not live or self.error is not None:
                return
            try:
                src, kind, args = msg.recv_message(group, None, timeout)
                failing_since = None
            except Exception as err:
                # A receive from any generator fails when one of them dies mid-connection (a
                # reset): which one, the control thread finds on its next send. Under
                # "continue" the others may still be heard: retry for up to timeout_s.
                now = time.monotonic()
                failing_since = failing_since or now
                if self.on_loss == "stop" or now - failing_since > timeout:
                    self._fail(f"no message from generator ranks {live}: "
                               f"{msg.describe_failure(err)}")
                    return
                time.sleep(_RETRY_S)
                continue
            try:
                self._handle(src, kind, args)
            except Exception as err:
                self._lose([(src, f"receiving {kind.name} from generator rank {src}: "
                                  f"{msg.describe_failure(err)}")])
                if self.error is not None:
                    return

    def deliver(self, src: int, groups: list, meta: dict[str, Any], nbytes: int) -> None:
        """Under the lock: groups of one DATA message into the buffer, with their cursor."""
        with self._cond:
            proto.check_credit(src, len(groups), self._outstanding[src])
            self.buffer.add(groups)
            self._outstanding[src] -= len(groups)
            self._groups[src] += len(groups)
            self._images[src] += sum(g.num_images for g in groups)
            self._bytes += nbytes
            self._idle_fraction[src] = float(meta["idle_fraction"])
            self._made_rate[src] = float(meta["images_per_s"])
            self._skipped[src] = int(meta.get("skipped", 0))
            self._cursors[src] = proto.newer_cursor(
                self._cursors.get(src), Cursor.from_dict(meta["cursor"])
            )
            self.last_arrival = time.monotonic()

    def _handle(self, src: int, kind: Kind, args: list[int]) -> None:
        group, timeout = self.groups.data_plane, self.timeout_s
        reason = ""
        if kind == Kind.DATA:
            header, payload = msg.recv_data(group, src, args, timeout)
            groups, extra = unpack_groups(header, payload)
            self.deliver(src, groups, json.loads(extra), header.numel() * 8 + payload.numel())
        elif kind == Kind.FAIL:
            reason = msg.recv_blob(group, src, args[0], timeout).decode("utf-8", "replace")
        with self._cond:
            self._state[src] = proto.gen_on_message(self._state[src], kind, ready=args[0] == 0)
            if kind == Kind.END:
                self._outstanding[src] = 0
            self._last_seen[src] = time.monotonic()
            self._cond.notify_all()
        if kind == Kind.FAIL:
            self._lose([(src, f"generator rank {src} failed: {reason}")])

    # ---- control thread ----------------------------------------------------------------------

    def _send(self, g: int, kind: Kind, *args: int, blob: bytes = b"") -> bool:
        """Send on the control group; a failure loses generator `g`."""
        try:
            msg.send_message(self.groups.control, g, kind, *args, blob=blob,
                             timeout_s=self.timeout_s)
            return True
        except Exception as err:
            self._lose([(g, f"generator rank {g}: {msg.describe_failure(err)}")])
            return False

    def _control_loop(self) -> None:
        interval = msg.keepalive_interval(self.timeout_s)
        remote = msg.remote_keepalive_interval(self.timeout_s)
        every = {g: interval if g in self.preferred else remote for g in self.generators}
        # 1. Hello: where each generator's stream continues (RESUME) or that it starts fresh.
        for g in self.generators:
            if g in self._resume:
                self._send(g, Kind.RESUME, blob=json.dumps(self._resume[g].to_dict()).encode())
            else:
                self._send(g, Kind.START)
        last_sent = dict.fromkeys(self.generators, time.monotonic())
        while True:
            # 2. Wait for room, a stop, or the next keepalive; then decide (protocol) under the
            # lock and send outside it.
            with self._cond:
                self._cond.wait(timeout=interval / 2)
                now = time.monotonic()
                step = proto.control_step(
                    self._state, self._outstanding, self.buffer.room(),
                    self.credits_per_generator, self.preferred, self._last_seen, last_sent,
                    every, now, self._started_at, self.timeout_s, self.startup_timeout_s,
                    self._stopping, self._stop_reason)
                self._state = step.states
                for g, n in step.grants.items():
                    self._outstanding[g] += n
            self._lose(step.lost)
            for g, kind, arg, blob in step.sends:
                if self._send(g, kind, *([arg] if kind == Kind.CREDIT else []), blob=blob):
                    last_sent[g] = now
            if step.done:
                return

    # ---- what the trainer reads --------------------------------------------------------------

    def cursors(self) -> dict[int, dict[str, Any]]:
        """Per generator rank, the cursor record after the last group this trainer received."""
        with self._cond:
            return {g: c.to_dict() for g, c in self._cursors.items()}

    def outstanding(self) -> dict[int, int]:
        with self._cond:
            return dict(self._outstanding)

    def counters(self) -> dict[str, Any]:
        """Run-long totals: groups and images per generator rank, bytes."""
        with self._cond:
            return {"groups": dict(self._groups), "images": dict(self._images),
                    "bytes": self._bytes}

    def _straggler_metrics(self, live: list[int]) -> dict[str, float]:
        """Under the lock: each live generator's image rate (as it reports it) over the median
        of its live peers', `gen/rate_vs_peers/rank{g}`, and `gen/stragglers`, the count below
        STRAGGLER_SHARE; the console names a straggler when the set changes."""
        rates = {g: self._made_rate[g] for g in live if g in self._made_rate}
        shares = rate_vs_peers(rates)
        values = {f"gen/rate_vs_peers/rank{g}": share for g, share in shares.items()}
        slow = [g for g, share in shares.items() if share < self.STRAGGLER_SHARE]
        values["gen/stragglers"] = float(len(slow))
        if slow != self._stragglers and self._speaks:
            for g in sorted(set(slow) - set(self._stragglers)):
                console(f"straggler: generator rank {g} makes {rates[g]:.1f} img/s, "
                        f"{values[f'gen/rate_vs_peers/rank{g}']:.0%} of its peers' median "
                        f"(below {self.STRAGGLER_SHARE:.0%}): a slow or shared device?",
                        rank=self.rank)
        self._stragglers = slow
        return values

    def metrics(self) -> dict[str, float]:
        """Rates since the previous call: `transport/MB_per_s`, `gen/images_per_s` (received by
        this trainer, total and `gen/images_per_s/rank{r}`); and as generators report them,
        `gen/idle_fraction` (mean time share waiting for credit) and `gen/made_images_per_s`."""
        with self._cond:
            t0, bytes0, images0 = self._window
            now = time.monotonic()
            elapsed = max(now - t0, 1e-9)
            values = {"transport/MB_per_s": (self._bytes - bytes0) / elapsed / 1e6}
            total = 0.0
            for g in self.generators:
                rate = (self._images[g] - images0[g]) / elapsed
                values[f"gen/images_per_s/rank{g}"] = rate
                total += rate
            values["gen/images_per_s"] = total
            live = [g for g, s in self._state.items() if s not in proto.GONE and g not in self.lost]
            values["gen/generators_live"] = float(len(live))
            values["gen/generators_lost"] = float(len(self.lost))
            values["gen/skipped_groups"] = float(sum(self._skipped.values()))
            for g in self.generators:
                values[f"gen/live/rank{g}"] = float(g in live)
            values.update(self._straggler_metrics(live))
            if self._idle_fraction:
                values["gen/idle_fraction"] = sum(self._idle_fraction.values()) / len(
                    self._idle_fraction
                )
                # What generators report making since their start (all trainers' share).
                values["gen/made_images_per_s"] = sum(self._made_rate.values())
            self._window = (now, self._bytes, dict(self._images))
        return values
