"""The generator side of the transport: credits in, caption groups out, on background threads.

- The listen thread takes messages from any trainer on the control group: START/RESUME,
  CREDIT, KEEPALIVE and STOP.
- The send thread owns the data plane: it packs and sends batches in the order they were
  queued, answers a clean STOP with END, sends KEEPALIVE when idle, and FAIL on failure. Sending
  on its own thread lets the producer make the next batch while the last one is on the wire.

The generator's main loop (jobs/generator.py) only reserves credit and queues batches.
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
from online_stablerep.transport.messages import Kind, TransportError
from online_stablerep.transport.receiver import newer_cursor
from online_stablerep.transport.wire import pack_groups


class GeneratorLink:
    """One generator rank's connection to every trainer rank.

    Args:
        groups: this rank's process groups (data_plane and control are used).
        timeout_s: a trainer silent this long (no credit, no keepalive) fails the generator.
    """

    def __init__(self, groups: JobGroups, timeout_s: float) -> None:
        assert groups.data_plane is not None and groups.control is not None
        self.groups = groups
        self.rank = groups.rank
        self.timeout_s = timeout_s
        self.trainers = groups.roles.trainer_ranks
        self.error: TransportError | None = None
        self.idle_s = 0.0
        self._cond = threading.Condition()
        self._credit = dict.fromkeys(self.trainers, 0)
        self._hello: dict[int, dict[str, Any] | None] = {}
        self._stopped: set[int] = set()
        self._aborted: set[int] = set()  # trainers that stopped with a failure reason
        self._done_with: set[int] = set()  # trainers sent END or FAIL: nothing more goes there
        self._queue: deque[tuple[Kind, int, Any]] = deque()
        self._fail_reason: str | None = None
        self._last_seen = dict.fromkeys(self.trainers, time.monotonic())
        self._listen = threading.Thread(target=self._listen_loop, name="link-listen", daemon=True)
        self._send = threading.Thread(target=self._send_loop, name="link-send", daemon=True)
        self._listen.start()

    # ---- main-thread API ---------------------------------------------------------------------

    def _raise_if_failed(self) -> None:
        """Under the lock: raise the first error, or name a trainer that went silent."""
        if self.error is not None:
            raise self.error
        now = time.monotonic()
        for t in self.trainers:
            if t not in self._stopped and now - self._last_seen[t] > self.timeout_s:
                self.error = TransportError(
                    f"generator rank {self.rank}: trainer rank {t} stopped answering: no message "
                    f"for {self.timeout_s:g} s (transport.timeout_s)"
                )
                raise self.error

    def wait_hello(self) -> dict[str, Any] | None:
        """Block until every trainer said START or RESUME (at most timeout_s); then start
        sending. Returns the cursor record to resume from (the newest any trainer holds)."""
        deadline = time.monotonic() + self.timeout_s
        with self._cond:
            while len(self._stopped.union(self._hello)) < len(self.trainers):
                if self.error is not None:
                    raise self.error
                if time.monotonic() > deadline:
                    missing = [t for t in self.trainers if t not in self._hello]
                    raise TransportError(
                        f"generator rank {self.rank}: no START or RESUME from trainer ranks "
                        f"{missing} within {self.timeout_s:g} s (transport.timeout_s)"
                    )
                self._cond.wait(timeout=0.5)
            resume = None
            for record in self._hello.values():
                resume = newer_cursor(resume, record)
        self._send.start()
        return resume

    def wait_credit(self) -> bool:
        """Block until some trainer granted credit (True) or every trainer stopped (False);
        the time spent here is the generator's idle time."""
        start = time.monotonic()
        with self._cond:
            while True:
                self._raise_if_failed()
                if any(self._credit[t] for t in self.trainers if t not in self._stopped):
                    break
                if len(self._stopped) == len(self.trainers):
                    break
                self._cond.wait(timeout=0.5)
            self.idle_s += time.monotonic() - start
            return len(self._stopped) < len(self.trainers)

    def take_credit(self, most: int) -> tuple[int, int] | None:
        """Reserve up to `most` groups of credit at the trainer holding the most credit (so no
        trainer starves while another fills up): (trainer rank, groups), or None when every
        trainer stopped."""
        if not self.wait_credit():
            return None
        with self._cond:
            live = [t for t in self.trainers if t not in self._stopped and self._credit[t]]
            trainer = max(live, key=lambda t: self._credit[t])
            count = min(most, self._credit[trainer])
            self._credit[trainer] -= count
            return trainer, count

    def send(self, trainer: int, groups: list[CaptionGroup], meta: dict[str, Any]) -> None:
        """Queue a batch for `trainer` (credit already taken); `meta` travels as JSON."""
        with self._cond:
            self._raise_if_failed()
            self._queue.append((Kind.DATA, trainer, (groups, json.dumps(meta).encode())))
            self._cond.notify_all()

    def finish(self) -> None:
        """The stream ended: END to every trainer after the queued data, then wait (as long as
        trainers keep answering) until each sent STOP."""
        with self._cond:
            for t in self.trainers:
                self._queue.append((Kind.END, t, None))
            self._cond.notify_all()
            while len(self._stopped) < len(self.trainers):
                self._raise_if_failed()
                self._cond.wait(timeout=0.5)
        self.close()

    def fail(self, reason: str) -> None:
        """Tell every trainer still listening that this generator failed, and wait briefly
        for their STOP acknowledgements so the message is read before the connection closes."""
        with self._cond:
            self._fail_reason = reason
            self._cond.notify_all()
        if not self._send.ident:
            self._send.start()
        self._send.join(timeout=self.timeout_s)
        deadline = time.monotonic() + min(self.timeout_s, 10.0)
        with self._cond:
            while len(self._stopped) < len(self.trainers) and time.monotonic() < deadline:
                self._cond.wait(timeout=0.2)

    def close(self) -> None:
        """Join both threads (they end once every trainer stopped and got END or FAIL)."""
        for thread in (self._send, self._listen):
            if thread.ident:
                thread.join(timeout=self.timeout_s)

    @property
    def all_stopped(self) -> bool:
        with self._cond:
            return len(self._stopped) == len(self.trainers)

    # ---- listen thread -----------------------------------------------------------------------

    def _set_error(self, text: str) -> None:
        with self._cond:
            if self.error is None:
                self.error = TransportError(f"generator rank {self.rank}: {text}")
            self._cond.notify_all()

    def _listen_loop(self) -> None:
        group, timeout = self.groups.control, self.timeout_s
        while True:
            with self._cond:
                live = [t for t in self.trainers if t not in self._stopped]
            if not live:
                return
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
                if kind == Kind.START:
                    self._hello[src] = None
                elif kind == Kind.RESUME:
                    self._hello[src] = json.loads(blob)
                elif kind == Kind.CREDIT:
                    self._credit[src] += args[0]
                elif kind == Kind.STOP:
                    self._stopped.add(src)
                    self._credit[src] = 0
                    if blob:
                        self._aborted.add(src)
                        self.error = self.error or TransportError(
                            f"generator rank {self.rank}: trainer rank {src} aborted: "
                            f"{blob.decode('utf-8', 'replace')}"
                        )
                    elif src in self._hello:
                        self._queue.append((Kind.END, src, None))
                    else:
                        # Stopped before it started receiving: nothing was sent, no END due.
                        self._done_with.add(src)
                elif kind != Kind.KEEPALIVE:
                    self.error = self.error or TransportError(
                        f"generator rank {self.rank}: unexpected {kind.name} from trainer {src}"
                    )
                self._cond.notify_all()

    # ---- send thread -------------------------------------------------------------------------

    def _send_loop(self) -> None:
        group, timeout = self.groups.data_plane, self.timeout_s
        interval = msg.keepalive_interval(timeout)
        last_sent = dict.fromkeys(self.trainers, time.monotonic())
        while True:
            with self._cond:
                if (self._fail_reason is None and not self._queue
                        and len(self._done_with) < len(self.trainers)):
                    self._cond.wait(timeout=interval / 2)
                reason = self._fail_reason
                item = self._queue.popleft() if self._queue and reason is None else None
                open_ = [t for t in self.trainers if t not in self._done_with]
                listening = [t for t in open_ if t not in self._aborted]
            if not open_:
                return
            if reason is not None:
                for t in listening:
                    try:
                        msg.send_message(group, t, Kind.FAIL, blob=reason.encode(),
                                         timeout_s=timeout)
                    except Exception:
                        continue  # that trainer is gone too; the others still hear about it
                with self._cond:
                    self._done_with.update(open_)
                return
            now = time.monotonic()
            if item is None:
                targets = [(Kind.KEEPALIVE, t, None) for t in open_
                           if now - last_sent[t] >= interval]
            else:
                targets = [item] if item[1] in open_ else []
            for kind, t, body in targets:
                try:
                    if kind == Kind.DATA:
                        groups, extra = body
                        header, payload = pack_groups(groups, extra)
                        msg.send_data(group, t, header, payload, timeout)
                    else:
                        msg.send_message(group, t, kind, timeout_s=timeout)
                except Exception as err:
                    with self._cond:
                        self._done_with.add(t)
                    self._set_error(f"sending {kind.name} to trainer rank {t}: "
                                    f"{msg.describe_failure(err)}")
                    continue
                last_sent[t] = now
                if kind == Kind.END:
                    with self._cond:
                        self._done_with.add(t)
