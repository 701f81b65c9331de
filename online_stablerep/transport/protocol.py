"""The transport's protocol as data: the cursor record, each side's view of its peers as a state
enum, and the transitions and the credit rule as pure functions. The threads in receiver.py and
sender.py only do the gloo I/O and apply these under their lock (unit-tested in one process in
tests/test_transport_protocol.py).

A generator, as a trainer sees it (GenState):

    WARMING --DATA / keepalive "ready"--> STREAMING
    WARMING | STREAMING --END--> ENDED --STOP sent--> CLOSED
    WARMING | STREAMING --clean STOP sent--> STOPPING --END--> CLOSED
    any live --FAIL--> FAILED --STOP sent (the acknowledgement)--> CLOSED
    any live --aborting STOP sent--> CLOSED
    any live --silent for timeout_s, or a connection error--> LOST

What the threads do is decided here too: `control_step` returns, from one look at the
generators, what the trainer's control thread sends (credit, keepalives, STOP) and which
generators it now counts as lost; `loss_verdict` says whether a lost generator ends the trainer
(`roles.on_generator_loss`); `trainer_on_message` returns what a generator does with a trainer's
message besides changing its state (add credit, queue END, abort). Liveness (who is silent past
the time-out, whose keepalive is due) is computed here from the times the threads record.

A trainer, as a generator sees it (TrainerState):

    WAITING --START / RESUME--> OPEN ; WAITING --STOP--> CLOSED (nothing was sent: no END due)
    OPEN --clean STOP--> STOPPING --END sent--> CLOSED
    WAITING | OPEN --END or FAIL sent--> DRAINED --STOP--> CLOSED
    any not closed --STOP with a reason--> ABORTED
    any not closed --a send fails--> LOST
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from online_stablerep.transport.messages import Kind


class ProtocolError(RuntimeError):
    """A peer sent a message its state does not allow (or more groups than its credit)."""


# ---- the cursor record -----------------------------------------------------------------------


@dataclass(frozen=True)
class Cursor:
    """Where a generator's stream stands after the groups of one batch sent.

    Attributes:
        seq: the producer call the groups came from (1-based).
        end: groups of that call delivered so far.
        length: groups the call made.
        before: the producer's state before the call.
        after: its state after the call, only once the call is fully delivered.
    """

    seq: int
    end: int
    length: int
    before: dict[str, Any]
    after: dict[str, Any] | None = None

    @property
    def complete(self) -> bool:
        return self.end >= self.length

    def to_dict(self) -> dict[str, Any]:
        """The JSON form that travels in DATA and RESUME and is checkpointed."""
        return {"seq": self.seq, "end": self.end, "len": self.length, "before": self.before,
                "after": self.after}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Cursor:
        return cls(int(record["seq"]), int(record["end"]), int(record["len"]), record["before"],
                   record.get("after"))

    def resume_point(self) -> tuple[dict[str, Any], int, int]:
        """(producer state to load, calls already made, groups of the next call to drop): after
        the call if it was fully delivered, else redo it and drop what was delivered.

        Raises:
            ProtocolError: a complete call's record without the state after it.
        """
        if self.complete:
            if self.after is None:  # the record came from a peer or a checkpoint
                raise ProtocolError(f"cursor of call {self.seq}: complete but no state after it")
            return self.after, self.seq, 0
        return self.before, self.seq - 1, self.end


def newer_cursor(a: Cursor | None, b: Cursor | None) -> Cursor | None:
    """The cursor further along a generator's stream (by call number, then offset)."""
    if a is None or b is None:
        return a or b
    return a if (a.seq, a.end) >= (b.seq, b.end) else b


# ---- trainer side: the generators ------------------------------------------------------------


class GenState(enum.Enum):
    WARMING = "warming up"
    STREAMING = "streaming"
    ENDED = "ended"
    STOPPING = "stopping"
    FAILED = "failed"
    CLOSED = "closed"
    LOST = "lost"


# Generators the receive thread still expects messages from (a silent one is lost).
LISTENING = frozenset({GenState.WARMING, GenState.STREAMING, GenState.STOPPING})
# Generators that may be granted credit.
GRANTABLE = frozenset({GenState.WARMING, GenState.STREAMING})
# Generators the control thread talks to (credit, keepalives, STOP at the end).
TALKING = frozenset({GenState.WARMING, GenState.STREAMING, GenState.ENDED})
# Generators that will send no more groups.
FINISHED = frozenset({GenState.ENDED, GenState.FAILED, GenState.CLOSED, GenState.LOST})


def gen_on_message(state: GenState, kind: Kind, ready: bool = True) -> GenState:
    """A generator's state after its message `kind` reached the trainer.

    Args:
        ready: for KEEPALIVE, False while the generator is still warming up.

    Raises:
        ProtocolError: DATA from a generator that ended, or a message a generator never sends.
    """
    if state in (GenState.CLOSED, GenState.LOST, GenState.FAILED):
        return state  # late messages from a peer already settled change nothing
    if kind == Kind.KEEPALIVE:
        return GenState.STREAMING if state == GenState.WARMING and ready else state
    if kind == Kind.DATA:
        if state == GenState.ENDED:
            raise ProtocolError("DATA after END")
        return GenState.STREAMING if state == GenState.WARMING else state
    if kind == Kind.END:
        return GenState.CLOSED if state == GenState.STOPPING else GenState.ENDED
    if kind == Kind.FAIL:
        # A FAIL after our STOP needs no acknowledgement: the generator already has its STOP.
        return GenState.CLOSED if state == GenState.STOPPING else GenState.FAILED
    raise ProtocolError(f"unexpected {kind.name} from a generator")


def gen_on_stop_sent(state: GenState, abort: bool) -> GenState:
    """A generator's state after the trainer sent it STOP (`abort`: with a failure reason)."""
    if state in (GenState.CLOSED, GenState.LOST):
        return state
    if state in (GenState.WARMING, GenState.STREAMING) and not abort:
        return GenState.STOPPING
    return GenState.CLOSED


def gen_lost(state: GenState) -> GenState:
    """A generator went silent or its connection failed."""
    return state if state == GenState.CLOSED else GenState.LOST


def check_credit(src: int, groups: int, outstanding: int) -> None:
    """A DATA message of `groups` groups from generator `src` holding `outstanding` credit.

    Raises:
        ProtocolError: it sent more than its credit (a trainer's buffer bound would break).
    """
    if groups > outstanding:
        raise ProtocolError(f"generator rank {src} sent {groups} groups on {outstanding} credits")


# Generator losses a trainer survives with roles.on_generator_loss=continue: the states of a
# generator that is gone without ending its stream.
GONE = frozenset({GenState.FAILED, GenState.LOST})


def loss_verdict(generators: list[int], policy: str, lost: list[int],
                 gone: set[int]) -> str | None:
    """Whether the generators just `lost` end this trainer: None to carry on, else why.

    Args:
        generators: every generator rank of the job.
        policy: roles.on_generator_loss: with "stop" any loss ends the trainer; with
            "continue" only the loss of the last one (every generator in `gone`). Generators
            that ended their streams cleanly are not gone: when the rest are lost, the trainers
            train on what they hold and stop as at the end of the stream.
        gone: every generator lost so far, `lost` included.
    """
    if not lost:
        return None
    if policy == "stop":
        return ""  # the loss's own message says it all
    if set(generators) <= gone:
        return (f"no generator left to send groups (generator ranks {sorted(gone)} lost; "
                "roles.on_generator_loss=continue ends the job only then)")
    return None


def silent_peers(last_seen: dict[int, float], watched: list[int], now: float,
                 timeout_s: float) -> list[int]:
    """The `watched` peers that sent nothing for `timeout_s` (keepalives included)."""
    return [p for p in watched if now - last_seen[p] > timeout_s]


@dataclass
class ControlStep:
    """What the trainer's control thread does after one look at its generators.

    Attributes:
        states: every generator's state afterwards.
        grants: generator rank -> credit granted now (already counted as outstanding).
        sends: (generator rank, kind, arg, blob) in order: STOP acknowledgements, then credit
            and keepalives, or the final STOPs.
        lost: (generator rank, why) newly lost: silent past the time-out or warming up past the
            start-up budget.
        done: the control thread ends after these sends (the trainer is stopping).
    """

    states: dict[int, GenState]
    grants: dict[int, int] = field(default_factory=dict)
    sends: list[tuple[int, Kind, int, bytes]] = field(default_factory=list)
    lost: list[tuple[int, str]] = field(default_factory=list)
    done: bool = False


def control_step(
    states: dict[int, GenState], outstanding: dict[int, int], room: int, per_generator: int,
    preferred: list[int] | None, last_seen: dict[int, float], last_sent: dict[int, float],
    every: dict[int, float], now: float, started_at: float, timeout_s: float,
    startup_timeout_s: float, stopping: bool, stop_reason: str | None,
) -> ControlStep:
    """One decision of the trainer's control thread (pure; the thread applies it under its lock
    and sends outside it).

    1. Liveness: a listening generator silent for `timeout_s` is lost, and one still warming
       up `startup_timeout_s` after the start.
    2. A generator that sent FAIL is acknowledged with STOP so it can exit.
    3. Stopping: STOP (with `stop_reason`, an abort, or clean) to every generator still
       talking; done.
    4. Otherwise credit where the buffer has `room` (the credit rule), and a keepalive to any
       talking generator not sent to for `every[g]` seconds.
    """
    states = dict(states)
    step = ControlStep(states)
    for g in silent_peers(last_seen, [g for g, s in states.items() if s in LISTENING], now,
                          timeout_s):
        states[g] = gen_lost(states[g])
        step.lost.append((g, f"generator rank {g} stopped answering: no message for "
                             f"{timeout_s:g} s (transport.timeout_s)"))
    if now - started_at > startup_timeout_s:
        for g in [g for g, s in states.items() if s == GenState.WARMING]:
            states[g] = gen_lost(states[g])
            step.lost.append((g, f"generator rank {g} still warming up {startup_timeout_s:g} s "
                                 "after the start (transport.startup_timeout_s)"))
    for g in [g for g, s in states.items() if s == GenState.FAILED]:
        step.sends.append((g, Kind.STOP, 0, b""))
        states[g] = gen_on_stop_sent(states[g], abort=False)
    talking = [g for g, s in states.items() if s in TALKING]
    if stopping:
        blob = (stop_reason or "").encode()
        for g in talking:
            step.sends.append((g, Kind.STOP, 0, blob))
            states[g] = gen_on_stop_sent(states[g], abort=stop_reason is not None)
        step.done = True
        return step
    grantable = [g for g, s in states.items() if s in GRANTABLE]
    step.grants = grant_credit(outstanding, grantable, room - sum(outstanding.values()),
                               per_generator, preferred)
    for g in talking:
        if step.grants.get(g):
            step.sends.append((g, Kind.CREDIT, step.grants[g], b""))
        elif now - last_sent[g] >= every[g]:
            step.sends.append((g, Kind.KEEPALIVE, 0, b""))
    return step


def grant_credit(
    outstanding: dict[int, int], grantable: list[int], room: int, per_generator: int,
    preferred: list[int] | None = None,
) -> dict[int, int]:
    """The credit rule: hand out at most `room` slots (the buffer's room minus credit already
    outstanding), one at a time to the grantable generator with the least outstanding, never
    more than `per_generator` outstanding each. Returns generator rank -> new credit.

    With `preferred` (the generators on this trainer's node) those are served first, and the
    others share at most `per_generator` outstanding in all: their credit mostly sits unused
    (they send to their own node first), and unused credit still counts against the room, so
    without that cap idle credit for hundreds of remote generators would fill the room and
    starve this node's generators."""
    held = {g: outstanding[g] for g in grantable}
    grants = dict.fromkeys(grantable, 0)
    near = [g for g in grantable if preferred is None or g in preferred]
    far = [g for g in grantable if g not in near]
    spill = per_generator - sum(v for g, v in outstanding.items()
                                if preferred is not None and g not in preferred)
    for tier, budget in ((near, room), (far, spill)):
        while room > 0 and budget > 0:
            open_ = [g for g in tier if held[g] < per_generator]
            if not open_:
                break
            g = min(open_, key=lambda r: held[r])
            held[g] += 1
            grants[g] += 1
            room -= 1
            budget -= 1
    return grants


# ---- generator side: the trainers ------------------------------------------------------------


class TrainerState(enum.Enum):
    WAITING = "waiting for START"
    OPEN = "open"
    STOPPING = "stopping"
    DRAINED = "drained"
    CLOSED = "closed"
    ABORTED = "aborted"
    LOST = "lost"


# Trainers that sent STOP (clean or not): nothing more is expected from them.
STOPPED = frozenset({TrainerState.STOPPING, TrainerState.CLOSED, TrainerState.ABORTED})
# Trainers the send thread still sends to (data, keepalives, END, FAIL).
SENDABLE = frozenset({TrainerState.OPEN, TrainerState.STOPPING})
# Trainers whose silence for timeout_s means they are gone.
WATCHED = frozenset({TrainerState.OPEN, TrainerState.DRAINED})


class Act(enum.Enum):
    """What a generator does with a trainer's message, besides the state change."""

    HELLO = "record where the stream resumes; start sending once every trainer said hello"
    CREDIT = "add the granted credit"
    END = "queue END after the data already queued (a clean STOP while open)"
    ABORT = "fail with the trainer's reason"
    DROP_CREDIT = "forget the trainer's credit (it stopped)"


def trainer_on_message(state: TrainerState, kind: Kind,
                       reason: bool = False) -> tuple[TrainerState, tuple[Act, ...]]:
    """A trainer's state after its message `kind` reached the generator, and what the
    generator does with it.

    Args:
        reason: for STOP, whether it carried a failure reason (an abort).

    Raises:
        ProtocolError: a message a trainer never sends, or START/RESUME twice.
    """
    if state == TrainerState.CLOSED:
        return state, ()
    if kind in (Kind.START, Kind.RESUME):
        if state == TrainerState.WAITING:
            return TrainerState.OPEN, (Act.HELLO,)
        if state == TrainerState.DRAINED:
            return state, (Act.HELLO,)  # a hello that crossed our FAIL
        raise ProtocolError(f"{kind.name} twice")
    if kind == Kind.CREDIT:
        return state, (Act.CREDIT,)
    if kind == Kind.KEEPALIVE:
        return state, ()
    if kind == Kind.STOP:
        if reason:
            return TrainerState.ABORTED, (Act.DROP_CREDIT, Act.ABORT)
        if state == TrainerState.OPEN:
            return TrainerState.STOPPING, (Act.DROP_CREDIT, Act.END)
        after = TrainerState.CLOSED if state != TrainerState.ABORTED else state
        return after, (Act.DROP_CREDIT,)
    raise ProtocolError(f"unexpected {kind.name} from a trainer")


def trainer_on_sent(state: TrainerState, kind: Kind) -> TrainerState:
    """A trainer's state after the generator sent it `kind` (END and FAIL end the sending)."""
    if kind not in (Kind.END, Kind.FAIL):
        return state
    if state in (TrainerState.WAITING, TrainerState.OPEN):
        return TrainerState.DRAINED
    if state == TrainerState.STOPPING:
        return TrainerState.CLOSED
    return state


def trainer_lost(state: TrainerState) -> TrainerState:
    """A send to the trainer failed: nothing more goes there."""
    return state if state in (TrainerState.CLOSED, TrainerState.ABORTED) else TrainerState.LOST


def pick_trainer(
    credit: dict[int, int], states: dict[int, TrainerState], most: int,
    preferred: list[int] | None = None,
) -> tuple[int, int] | None:
    """Where the next groups go: the open trainer holding the most credit (so no trainer starves
    while another fills up; ties to the lowest rank) and how many of `most` it takes; among
    `preferred` trainers (the generator's node) while any of them holds credit, else among all.
    None when no open trainer holds credit."""
    holders = [t for t, s in states.items() if s == TrainerState.OPEN and credit[t] > 0]
    if not holders:
        return None
    near = [t for t in holders if preferred is not None and t in preferred]
    trainer = max(near or holders, key=lambda t: (credit[t], -t))
    return trainer, min(most, credit[trainer])
