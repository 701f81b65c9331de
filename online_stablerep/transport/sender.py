"""The generator side of the transport: credits in, caption groups out, on background threads.

- The listen thread takes messages from any trainer on the control group: START/RESUME,
  CREDIT, KEEPALIVE and STOP.
- The send thread owns the data plane: it packs and sends batches in the order they were
  queued, answers a clean STOP with END, sends KEEPALIVE when idle, and FAIL on failure. Sending
  on its own thread lets the producer make the next batch while the last one is on the wire.

The generator's main loop (jobs/generator.py) only reserves credit and queues batches. What a
trainer's message makes the generator do, and which trainer went silent, is decided by
transport.protocol (`trainer_on_message`, `silent_peers`).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from typing import Any

from online_stablerep.distributed.groups import JobGroups
from online_stablerep.records import CaptionGroup
from online_stablerep.transport import messages as msg
from online_stablerep.transport import protocol as proto
from online_stablerep.transport.messages import Kind, TransportError
from online_stablerep.transport.protocol import Act, Cursor, TrainerState
from online_stablerep.transport.wire import pack_groups


class GeneratorLink:
    """One generator rank's connection to every trainer rank.

    Args:
        groups: this rank's process groups (data_plane and control are used).
        timeout_s: a trainer silent this long (no credit, no keepalive) fails the generator.
        startup_timeout_s: how long to wait for every trainer's START or RESUME (they build
            their model first; default: timeout_s).
    """

    def __init__(
        self, groups: JobGroups, timeout_s: float, startup_timeout_s: float | None = None
    ) -> None:
        assert groups.data_plane is not None and groups.control is not None
        self.groups = groups
        self.rank = groups.rank
        self.timeout_s = timeout_s
        self.startup_timeout_s = max(startup_timeout_s or timeout_s, timeout_s)
        self.trainers = groups.roles.trainer_ranks
        # Trainers on this generator's node come first (K/node layouts): images stay on the node.
        self.preferred = groups.roles.preferred_trainers(self.rank)
        self.error: TransportError | None = None
        self.idle_s = 0.0
        # Until the first batch is queued, keepalives tell trainers "alive, warming up".
        self.warming = True
        # When set (a signal), waits for credit return early so the caller can stop.
        self.interrupt: threading.Event | None = None
        self._cond = threading.Condition()
        self._state = dict.fromkeys(self.trainers, TrainerState.WAITING)
        self._credit = dict.fromkeys(self.trainers, 0)
        self._hello: dict[int, Cursor | None] = {}
        self._queue: deque[tuple[Kind, int, Any]] = deque()
        self._fail_reason: str | None = None
        self._last_seen = dict.fromkeys(self.trainers, time.monotonic())
        self._listen = threading.Thread(target=self._listen_loop, name="link-listen", daemon=True)
        self._send = threading.Thread(target=self._send_loop, name="link-send", daemon=True)
        self._listen.start()

    # ---- main-thread API ---------------------------------------------------------------------

    def _start_sending(self) -> None:
        """Under the lock: start the send thread once (after every hello, or to send FAIL)."""
        if not self._send.ident:
            self._send.start()

    def _raise_if_failed(self) -> None:
        """Under the lock: raise the first error, or name a trainer that went silent."""
        if self.error is not None:
            raise self.error
        watched = [t for t, s in self._state.items() if s in proto.WATCHED]
        for t in proto.silent_peers(self._last_seen, watched, time.monotonic(), self.timeout_s):
            self.error = TransportError(
                f"generator rank {self.rank}: trainer rank {t} stopped answering: no message "
                f"for {self.timeout_s:g} s (transport.timeout_s)"
            )
            raise self.error

    def _interrupted(self) -> bool:
        return self.interrupt is not None and self.interrupt.is_set()

    def _all_stopped(self) -> bool:
        return all(s in proto.STOPPED for s in self._state.values())

    def wait_hello(self) -> dict[str, Any] | None:
        """Block until every trainer said START or RESUME (at most startup_timeout_s). Returns
        the cursor record to resume from (the newest any trainer holds)."""
        deadline = time.monotonic() + self.startup_timeout_s
        with self._cond:
            while any(s == TrainerState.WAITING for s in self._state.values()):
                if self.error is not None:
                    raise self.error
                if time.monotonic() > deadline:
                    missing = [t for t, s in self._state.items() if s == TrainerState.WAITING]
                    raise TransportError(
                        f"generator rank {self.rank}: no START or RESUME from trainer ranks "
                        f"{missing} within {self.startup_timeout_s:g} s "
                        "(transport.startup_timeout_s)"
                    )
                self._cond.wait(timeout=0.5)
            resume = None
            for record in self._hello.values():
                resume = proto.newer_cursor(resume, record)
            self._last_seen = dict.fromkeys(self.trainers, time.monotonic())
            self._start_sending()
        return None if resume is None else resume.to_dict()

    def wait_credit(self) -> bool:
        """Block until some trainer granted credit (True) or every trainer stopped (False);
        the time spent here is the generator's idle time."""
        start = time.monotonic()
        with self._cond:
            while True:
                self._raise_if_failed()
                if proto.pick_trainer(self._credit, self._state, 1, self.preferred) is not None:
                    break
                if self._all_stopped() or self._interrupted():
                    break
                self._cond.wait(timeout=0.5)
            self.idle_s += time.monotonic() - start
            return not self._all_stopped()

    def take_credit(self, most: int) -> tuple[int, int] | None:
        """Reserve up to `most` groups of credit at the trainer holding the most credit (so no
        trainer starves while another fills up; a trainer of this node first): (trainer rank, groups), or None when every
        trainer stopped. Waiting and taking happen under one lock, so a STOP that arrives in
        between cannot leave nothing to take."""
        start = time.monotonic()
        with self._cond:
            try:
                while True:
                    self._raise_if_failed()
                    taken = proto.pick_trainer(self._credit, self._state, most,
                                                self.preferred)
                    if taken is not None:
                        self._credit[taken[0]] -= taken[1]
                        return taken
                    if self._all_stopped() or self._interrupted():
                        return None
                    self._cond.wait(timeout=0.5)
            finally:
                self.idle_s += time.monotonic() - start

    def send(self, trainer: int, groups: list[CaptionGroup], meta: dict[str, Any]) -> None:
        """Queue a batch for `trainer` (credit already taken); `meta` travels as JSON."""
        with self._cond:
            self._raise_if_failed()
            self.warming = False
            self._queue.append((Kind.DATA, trainer, (groups, json.dumps(meta).encode())))
            self._cond.notify_all()

    def finish(self) -> None:
        """The stream ended: END to every trainer after the queued data, then wait (as long as
        trainers keep answering) until each sent STOP."""
        with self._cond:
            for t in self.trainers:
                self._queue.append((Kind.END, t, None))
            self._cond.notify_all()
            while not self._all_stopped():
                self._raise_if_failed()
                self._cond.wait(timeout=0.5)
            # An abort (STOP with a reason) also counts as stopped: a generator whose stream
            # had ended still exits with the trainer's reason, not as a clean finish.
            if self.error is not None:
                raise self.error
        self.close()

    def fail(self, reason: str) -> None:
        """Tell every trainer still listening that this generator failed, and wait briefly
        for their STOP acknowledgements so the message is read before the connection closes."""
        with self._cond:
            self._fail_reason = reason
            self._cond.notify_all()
            self._start_sending()
        self._send.join(timeout=self.timeout_s)
        deadline = time.monotonic() + min(self.timeout_s, 10.0)
        with self._cond:
            while not self._all_stopped() and time.monotonic() < deadline:
                self._cond.wait(timeout=0.2)

    def close(self) -> None:
        """Join both threads (they end once every trainer stopped and got END or FAIL)."""
        for thread in (self._send, self._listen):
            if thread.ident:
                thread.join(timeout=self.timeout_s)

    @property
    def all_stopped(self) -> bool:
        with self._cond:
            return self._all_stopped()

    def states(self) -> dict[int, TrainerState]:
        with self._cond:
            return dict(self._state)

    # ---- listen thread -----------------------------------------------------------------------

    def _set_error(self, text: str) -> None:
        with self._cond:
            if self.error is None:
                self.error = TransportError(f"generator rank {self.rank}: {text}")
            self._cond.notify_all()

    def _listen_loop(self) -> None:
        group = self.groups.control
        while True:
            with self._cond:
                live = [t for t, s in self._state.items() if s not in proto.STOPPED]
                # Trainers build their model before their hello: that wait has its own budget.
                waiting = any(s == TrainerState.WAITING for s in self._state.values())
            if not live:
                return
            timeout = self.startup_timeout_s if waiting else self.timeout_s
            try:
                src, kind, args = msg.recv_message(group, None, timeout)
                blob = b""
                if kind in (Kind.RESUME, Kind.STOP):
                    blob = msg.recv_blob(group, src, args[0], timeout)
            except Exception as err:
                self._set_error(f"no message from trainer ranks {live}: "
                                f"{msg.describe_failure(err)}")
                return
            with self._cond:
                self._last_seen[src] = time.monotonic()
                try:
                    self._state[src], acts = proto.trainer_on_message(self._state[src], kind,
                                                                      reason=bool(blob))
                except proto.ProtocolError as err:
                    self.error = self.error or TransportError(
                        f"generator rank {self.rank}: trainer rank {src}: {err}"
                    )
                    self._cond.notify_all()
                    continue
                for act in acts:
                    if act == Act.HELLO:
                        self._hello[src] = Cursor.from_dict(json.loads(blob)) if blob else None
                        if not any(s == TrainerState.WAITING for s in self._state.values()):
                            # Keepalives ("alive, warming up") flow while the model is built.
                            self._start_sending()
                    elif act == Act.CREDIT:
                        self._credit[src] += args[0]
                    elif act == Act.DROP_CREDIT:
                        self._credit[src] = 0
                    elif act == Act.ABORT:
                        self.error = self.error or TransportError(
                            f"generator rank {self.rank}: trainer rank {src} aborted: "
                            f"{blob.decode('utf-8', 'replace')}"
                        )
                    elif act == Act.END:
                        self._queue.append((Kind.END, src, None))
                self._cond.notify_all()

    # ---- send thread -------------------------------------------------------------------------

    def _sent(self, t: int, kind: Kind) -> None:
        with self._cond:
            self._state[t] = proto.trainer_on_sent(self._state[t], kind)

    def _send_loop(self) -> None:
        group, timeout = self.groups.data_plane, self.timeout_s
        interval = msg.keepalive_interval(timeout)
        remote = msg.remote_keepalive_interval(timeout)
        every = {t: interval if t in self.preferred else remote for t in self.trainers}
        last_sent = dict.fromkeys(self.trainers, 0.0)
        while True:
            with self._cond:
                open_ = [t for t, s in self._state.items() if s in proto.SENDABLE]
                if self._fail_reason is None and not self._queue and open_:
                    self._cond.wait(timeout=interval / 2)
                    open_ = [t for t, s in self._state.items() if s in proto.SENDABLE]
                reason = self._fail_reason
                item = self._queue.popleft() if self._queue and reason is None else None
                warming = self.warming
                # FAIL also goes to trainers whose hello has not arrived: they will read it.
                fail_to = [t for t, s in self._state.items()
                           if s in proto.SENDABLE or s == TrainerState.WAITING]
            if reason is not None:
                for t in fail_to:
                    try:
                        msg.send_message(group, t, Kind.FAIL, blob=reason.encode(),
                                         timeout_s=timeout)
                    except Exception:
                        pass  # that trainer is gone too; the others still hear about it
                    self._sent(t, Kind.FAIL)
                return
            if not open_:
                return
            now = time.monotonic()
            if item is None:
                targets = [(Kind.KEEPALIVE, t, None) for t in open_
                           if now - last_sent[t] >= every[t]]
            else:
                targets = [item] if item[1] in open_ else []
            for kind, t, body in targets:
                try:
                    if kind == Kind.DATA:
                        groups, extra = body
                        header, payload = pack_groups(groups, extra)
                        msg.send_data(group, t, header, payload, timeout)
                    else:
                        # A keepalive's argument says "alive, warming up" (1) or "ready" (0).
                        args = (int(warming),) if kind == Kind.KEEPALIVE else ()
                        msg.send_message(group, t, kind, *args, timeout_s=timeout)
                except Exception as err:
                    with self._cond:
                        self._state[t] = proto.trainer_lost(self._state[t])
                    self._set_error(f"sending {kind.name} to trainer rank {t}: "
                                    f"{msg.describe_failure(err)}")
                    continue
                last_sent[t] = now
                self._sent(t, kind)
