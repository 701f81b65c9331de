"""The transport protocol as pure functions, in one process: cursor records, each side's peer
states and their transitions, the credit rule and the choice of trainer."""

import pytest

from online_stablerep.transport.messages import Kind
from online_stablerep.transport.protocol import (
    FINISHED,
    GRANTABLE,
    LISTENING,
    STOPPED,
    TALKING,
    Act,
    Cursor,
    GenState,
    ProtocolError,
    TrainerState,
    check_credit,
    control_step,
    gen_lost,
    gen_on_message,
    gen_on_stop_sent,
    grant_credit,
    loss_verdict,
    newer_cursor,
    pick_trainer,
    silent_peers,
    trainer_lost,
    trainer_on_message,
    trainer_on_sent,
)

G = GenState
T = TrainerState


# ---- cursor ---------------------------------------------------------------------------------


def test_cursor_round_trips_through_its_checkpointed_form():
    cursor = Cursor(3, 2, 4, {"epoch": 0, "position": 8}, None)
    record = cursor.to_dict()
    assert set(record) == {"seq", "end", "len", "before", "after"}
    assert Cursor.from_dict(record) == cursor


def test_resume_point_continues_after_a_delivered_call_or_redoes_a_partial_one():
    done = Cursor(5, 4, 4, {"p": 16}, {"p": 20})
    assert done.resume_point() == ({"p": 20}, 5, 0)
    partial = Cursor(5, 3, 4, {"p": 16}, None)
    assert partial.resume_point() == ({"p": 16}, 4, 3)  # redo call 5, drop its 3 delivered


def test_newer_cursor_orders_by_call_then_offset():
    a, b, c = Cursor(2, 4, 4, {}), Cursor(3, 1, 4, {}), Cursor(3, 2, 4, {})
    assert newer_cursor(a, b) is b and newer_cursor(c, b) is c
    assert newer_cursor(None, a) is a and newer_cursor(a, None) is a
    assert newer_cursor(None, None) is None


# ---- a generator as a trainer sees it -------------------------------------------------------


@pytest.mark.parametrize("state, kind, ready, after", [
    (G.WARMING, Kind.KEEPALIVE, False, G.WARMING),
    (G.WARMING, Kind.KEEPALIVE, True, G.STREAMING),
    (G.WARMING, Kind.DATA, True, G.STREAMING),
    (G.STREAMING, Kind.DATA, True, G.STREAMING),
    (G.STREAMING, Kind.END, True, G.ENDED),
    (G.STOPPING, Kind.DATA, True, G.STOPPING),  # in flight when STOP went out
    (G.STOPPING, Kind.END, True, G.CLOSED),
    (G.STREAMING, Kind.FAIL, True, G.FAILED),
    (G.WARMING, Kind.FAIL, True, G.FAILED),
    (G.STOPPING, Kind.FAIL, True, G.CLOSED),  # it already has its STOP: no acknowledgement
    (G.LOST, Kind.DATA, True, G.LOST),
    (G.CLOSED, Kind.KEEPALIVE, True, G.CLOSED),
])
def test_generator_transitions_on_messages(state, kind, ready, after):
    assert gen_on_message(state, kind, ready) == after


@pytest.mark.parametrize("state, kind", [(G.ENDED, Kind.DATA), (G.STREAMING, Kind.CREDIT),
                                         (G.WARMING, Kind.START)])
def test_generator_messages_its_state_forbids_are_protocol_errors(state, kind):
    with pytest.raises(ProtocolError):
        gen_on_message(state, kind)


@pytest.mark.parametrize("state, abort, after", [
    (G.STREAMING, False, G.STOPPING),
    (G.WARMING, False, G.STOPPING),
    (G.STREAMING, True, G.CLOSED),
    (G.ENDED, False, G.CLOSED),
    (G.FAILED, False, G.CLOSED),  # the acknowledgement of its FAIL
    (G.LOST, False, G.LOST),
])
def test_generator_transitions_on_stop_sent(state, abort, after):
    assert gen_on_stop_sent(state, abort) == after


def test_lost_generator_gets_no_credit_no_messages_and_counts_as_finished():
    for state in (G.WARMING, G.STREAMING, G.STOPPING, G.ENDED):
        lost = gen_lost(state)
        assert lost == G.LOST
        assert lost not in GRANTABLE | TALKING | LISTENING and lost in FINISHED
    assert gen_lost(G.CLOSED) == G.CLOSED


def test_a_clean_stop_waits_for_every_end_while_an_ended_stream_is_finished():
    assert G.STOPPING in LISTENING and G.STOPPING not in FINISHED
    assert G.ENDED in TALKING and G.ENDED in FINISHED  # it still gets its STOP
    assert G.WARMING in GRANTABLE  # credit flows while it warms up: its first call fills it


# ---- credit rule ----------------------------------------------------------------------------


def test_credit_fills_the_room_most_starved_first_and_caps_each_generator():
    # 1 -> 1, 1 -> 2, 3 -> 2, 1 -> 3, 3 -> 3: everyone levelled at 3 outstanding.
    assert grant_credit({1: 0, 2: 3, 3: 1}, [1, 2, 3], room=5, per_generator=4) == {
        1: 3, 2: 0, 3: 2}
    # With more room than the caps allow, each stops at per_generator.
    assert grant_credit({1: 0, 2: 3}, [1, 2], room=50, per_generator=4) == {1: 4, 2: 1}


def test_credit_never_exceeds_the_room_nor_goes_to_generators_not_grantable():
    assert grant_credit({1: 0, 2: 0}, [1], room=10, per_generator=4) == {1: 4}
    assert grant_credit({1: 0, 2: 0}, [1, 2], room=0, per_generator=4) == {1: 0, 2: 0}
    assert grant_credit({1: 4}, [1], room=3, per_generator=4) == {1: 0}
    assert grant_credit({}, [], room=3, per_generator=4) == {}


def test_credit_does_not_mutate_the_outstanding_map():
    outstanding = {1: 1}
    grant_credit(outstanding, [1], room=2, per_generator=4)
    assert outstanding == {1: 1}


def test_credit_goes_to_this_nodes_generators_first_and_little_to_the_others():
    # Generators 3 and 7 are on this trainer's node: they fill up to the cap first; the others
    # share at most per_generator (4) in all, most starved first, ties to the lowest rank.
    grants = grant_credit({3: 0, 7: 2, 11: 0, 15: 0, 19: 0}, [3, 7, 11, 15, 19], room=50,
                          per_generator=4, preferred=[3, 7])
    assert grants == {3: 4, 7: 2, 11: 2, 15: 1, 19: 1}
    # Remote credit already outstanding (even from a generator not grantable now) counts.
    assert grant_credit({3: 4, 11: 3, 15: 0}, [3, 15], room=50, per_generator=4,
                        preferred=[3]) == {3: 0, 15: 1}
    # Room only for the local one: remote generators get nothing.
    assert grant_credit({3: 0, 11: 0}, [3, 11], room=4, per_generator=4,
                        preferred=[3]) == {3: 4, 11: 0}
    # A local generator that is not grantable (ended) does not hold back the others.
    assert grant_credit({3: 0, 11: 0}, [11], room=9, per_generator=4, preferred=[3]) == {11: 4}


def test_idle_remote_credit_never_fills_the_room_at_scale():
    # 125 nodes of 1 trainer and 7 generators: the others' generators never send here while
    # their own trainer has credit; what they may hold stays one generator's worth.
    local = list(range(1, 8))
    remote = [r for r in range(8, 1000) if r % 8]  # 868: local ranks 1-7 of the other nodes
    outstanding = dict.fromkeys(local + remote, 0)
    for _ in range(50):  # the trainer grants again and again; nobody sends
        for g, n in grant_credit(outstanding, local + remote, room=688 - sum(
                outstanding.values()), per_generator=8, preferred=local).items():
            outstanding[g] += n
    assert sum(outstanding[g] for g in local) == 56 and sum(outstanding[g] for g in remote) == 8


# ---- a trainer as a generator sees it -------------------------------------------------------


@pytest.mark.parametrize("state, kind, reason, after, acts", [
    (T.WAITING, Kind.START, False, T.OPEN, (Act.HELLO,)),
    (T.WAITING, Kind.RESUME, False, T.OPEN, (Act.HELLO,)),
    # stopped before it started: no END due
    (T.WAITING, Kind.STOP, False, T.CLOSED, (Act.DROP_CREDIT,)),
    (T.OPEN, Kind.CREDIT, False, T.OPEN, (Act.CREDIT,)),
    (T.OPEN, Kind.KEEPALIVE, False, T.OPEN, ()),
    (T.OPEN, Kind.STOP, False, T.STOPPING, (Act.DROP_CREDIT, Act.END)),
    (T.OPEN, Kind.STOP, True, T.ABORTED, (Act.DROP_CREDIT, Act.ABORT)),
    (T.DRAINED, Kind.STOP, False, T.CLOSED, (Act.DROP_CREDIT,)),
    (T.DRAINED, Kind.START, False, T.DRAINED, (Act.HELLO,)),  # a hello that crossed our FAIL
    (T.LOST, Kind.STOP, False, T.CLOSED, (Act.DROP_CREDIT,)),
    (T.CLOSED, Kind.KEEPALIVE, False, T.CLOSED, ()),
])
def test_trainer_transitions_on_messages_and_what_the_generator_does(state, kind, reason, after,
                                                                     acts):
    assert trainer_on_message(state, kind, reason) == (after, acts)


@pytest.mark.parametrize("state, kind", [(T.OPEN, Kind.START), (T.OPEN, Kind.DATA),
                                         (T.OPEN, Kind.END)])
def test_trainer_messages_its_state_forbids_are_protocol_errors(state, kind):
    with pytest.raises(ProtocolError):
        trainer_on_message(state, kind)


@pytest.mark.parametrize("state, kind, after", [
    (T.OPEN, Kind.DATA, T.OPEN),
    (T.OPEN, Kind.END, T.DRAINED),
    (T.OPEN, Kind.FAIL, T.DRAINED),
    (T.WAITING, Kind.FAIL, T.DRAINED),
    (T.STOPPING, Kind.END, T.CLOSED),
    (T.ABORTED, Kind.FAIL, T.ABORTED),
])
def test_trainer_transitions_on_sent(state, kind, after):
    assert trainer_on_sent(state, kind) == after


def test_trainer_lost_and_stopped_sets():
    assert trainer_lost(T.OPEN) == T.LOST and trainer_lost(T.ABORTED) == T.ABORTED
    assert STOPPED == {T.STOPPING, T.CLOSED, T.ABORTED}


def test_pick_trainer_takes_the_open_trainer_holding_most_credit():
    states = {0: T.OPEN, 1: T.OPEN, 2: T.STOPPING}
    assert pick_trainer({0: 1, 1: 3, 2: 9}, states, most=2) == (1, 2)
    assert pick_trainer({0: 1, 1: 3, 2: 9}, states, most=8) == (1, 3)


def test_pick_trainer_with_no_credit_left_returns_none_instead_of_raising():
    # Every trainer stopped while the generator waited: nothing to take (was a ValueError).
    assert pick_trainer({0: 0, 1: 0}, {0: T.STOPPING, 1: T.OPEN}, most=4) is None
    assert pick_trainer({}, {}, most=4) is None


def test_pick_trainer_prefers_its_own_nodes_trainers_while_they_hold_credit():
    states = dict.fromkeys([0, 1, 4, 5], T.OPEN)
    # Remote trainer 4 holds the most credit, but local trainers 0 and 1 come first.
    assert pick_trainer({0: 1, 1: 2, 4: 9, 5: 0}, states, most=8, preferred=[0, 1]) == (1, 2)
    # Ties go to the lowest rank, so the choice is a function of the credit alone.
    assert pick_trainer({0: 2, 1: 2, 4: 9, 5: 0}, states, most=1, preferred=[0, 1]) == (0, 1)
    # The node's trainers hold no credit (full buffers): spill to the others, most credit first.
    assert pick_trainer({0: 0, 1: 0, 4: 3, 5: 5}, states, most=8, preferred=[0, 1]) == (5, 5)
    # A local trainer that stopped is skipped even if it still shows credit.
    stopped = {**states, 1: T.STOPPING}
    assert pick_trainer({0: 0, 1: 6, 4: 3, 5: 0}, stopped, most=8, preferred=[0, 1]) == (4, 3)


# ---- the start-up budget, with a scripted generator in place of gloo --------------------------


def test_a_warming_generator_is_kept_until_the_startup_budget_then_named(monkeypatch):
    import time
    from types import SimpleNamespace

    from online_stablerep.replay import ReplayBuffer
    from online_stablerep.transport import messages as msg
    from online_stablerep.transport.receiver import Receiver

    def keepalives(group, src, timeout_s):
        time.sleep(0.1)  # "alive, warming up", ten times a second, for ever
        return 1, Kind.KEEPALIVE, [1, 0]

    monkeypatch.setattr(msg, "recv_message", keepalives)
    monkeypatch.setattr(msg, "send_message", lambda *a, **k: None)
    from online_stablerep.distributed.roles import Roles

    roles = Roles(world_size=2, num_generators=1)
    groups = SimpleNamespace(rank=0, roles=roles, data_plane="data", control="control")
    receiver = Receiver(groups, ReplayBuffer(8, 1), 4, timeout_s=0.5, startup_timeout_s=2.0)
    receiver.start()
    time.sleep(1.2)  # past timeout_s: still fine, it is warming up
    assert receiver.error is None and receiver.warming() == [1]
    deadline = time.monotonic() + 5
    while receiver.error is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "generator rank 1 still warming up" in str(receiver.error)
    assert "transport.startup_timeout_s" in str(receiver.error)
    assert receiver.states()[1] == GenState.LOST


def test_peers_on_other_nodes_are_pinged_less_often_but_well_inside_the_timeout():
    from online_stablerep.transport.messages import keepalive_interval, remote_keepalive_interval

    assert keepalive_interval(120) == 5 and remote_keepalive_interval(120) == 40
    # Three pings per timeout at least, and never more often than a local peer's.
    for timeout in (4, 10, 20, 120, 600):
        assert keepalive_interval(timeout) <= remote_keepalive_interval(timeout) <= timeout / 3


# ---- what the control thread sends, and when a generator is lost ------------------------------


def step(states, now=10.0, stopping=False, reason=None, room=8, last_seen=None, started=0.0):
    gens = list(states)
    return control_step(
        states, dict.fromkeys(gens, 0), room, per_generator=4, preferred=None,
        last_seen=last_seen or dict.fromkeys(gens, now), last_sent=dict.fromkeys(gens, now),
        every=dict.fromkeys(gens, 5.0), now=now, started_at=started, timeout_s=3.0,
        startup_timeout_s=30.0, stopping=stopping, stop_reason=reason)


def test_control_step_grants_credit_and_keeps_quiet_otherwise():
    out = step({1: G.STREAMING, 2: G.STREAMING})
    assert out.grants == {1: 4, 2: 4} and not out.lost and not out.done
    assert out.sends == [(1, Kind.CREDIT, 4, b""), (2, Kind.CREDIT, 4, b"")]
    assert step({1: G.STREAMING}, room=0).sends == []  # no room, keepalive not yet due


def test_control_step_loses_a_silent_generator_and_one_warming_up_too_long():
    out = step({1: G.STREAMING, 2: G.STREAMING}, last_seen={1: 10.0, 2: 6.0})
    assert out.states == {1: G.STREAMING, 2: G.LOST}
    assert [g for g, _ in out.lost] == [2] and "transport.timeout_s" in out.lost[0][1]
    assert [g for g, *_ in out.sends] == [1]  # credit only to the live one
    slow = step({1: G.WARMING}, now=40.0, started=0.0)
    assert slow.states == {1: G.LOST} and "transport.startup_timeout_s" in slow.lost[0][1]


def test_control_step_acknowledges_a_failure_and_stops_everyone_at_the_end():
    out = step({1: G.FAILED, 2: G.STREAMING})
    assert out.sends[0] == (1, Kind.STOP, 0, b"") and out.states[1] == G.CLOSED
    end = step({1: G.STREAMING, 2: G.ENDED, 3: G.LOST}, stopping=True, reason="boom")
    assert end.done and end.sends == [(1, Kind.STOP, 0, b"boom"), (2, Kind.STOP, 0, b"boom")]
    assert end.states == {1: G.CLOSED, 2: G.CLOSED, 3: G.LOST}
    clean = step({1: G.STREAMING}, stopping=True)
    assert clean.states == {1: G.STOPPING}  # waits for its END


def test_a_lost_generator_ends_the_trainer_under_stop_and_only_the_last_under_continue():
    assert loss_verdict([1, 2], "stop", [1], {1}) == ""
    assert loss_verdict([1, 2], "continue", [1], {1}) is None
    assert loss_verdict([1, 2], "continue", [], set()) is None
    last = loss_verdict([1, 2], "continue", [2], {1, 2})
    assert "no generator left" in last and "[1, 2]" in last
    # The other ended its stream cleanly: the trainers train on what they hold, then stop.
    assert loss_verdict([1, 2], "continue", [1], {1}) is None


def test_liveness_names_the_peers_silent_past_the_timeout():
    assert silent_peers({1: 0.0, 2: 5.0, 3: 0.0}, [1, 2], now=6.0, timeout_s=4.0) == [1]


def test_more_groups_than_credit_is_a_protocol_error_not_an_assert():
    check_credit(2, 3, 3)
    with pytest.raises(ProtocolError, match="generator rank 2 sent 4 groups on 3 credits"):
        check_credit(2, 4, 3)


def test_a_complete_cursor_without_its_after_state_is_a_protocol_error():
    with pytest.raises(ProtocolError):
        Cursor(3, 4, 4, {"p": 1}, None).resume_point()


def test_a_straggler_is_measured_against_its_peers_median_and_named_once(capsys):
    from types import SimpleNamespace

    from online_stablerep.distributed.roles import Roles
    from online_stablerep.replay import ReplayBuffer
    from online_stablerep.transport.receiver import Receiver, rate_vs_peers

    assert rate_vs_peers({1: 10.0, 2: 10.0, 3: 4.0}) == {1: 10 / 7, 2: 10 / 7, 3: 0.4}
    assert rate_vs_peers({1: 5.0}) == {}
    roles = Roles(world_size=4, num_generators=3)
    groups = SimpleNamespace(rank=0, roles=roles, data_plane="data", control="control")
    receiver = Receiver(groups, ReplayBuffer(8, 1), 4, timeout_s=10.0)
    cursor = Cursor(1, 0, 1, {}).to_dict()
    for g, rate in ((1, 10.0), (2, 9.0), (3, 3.0)):
        receiver.deliver(g, [], {"cursor": cursor, "images_per_s": rate, "idle_fraction": 0.0,
                                 "skipped": 2}, 0)
    values = receiver.metrics()
    assert values["gen/stragglers"] == 1 and values["gen/rate_vs_peers/rank3"] == 3.0 / 9.5
    assert values["gen/skipped_groups"] == 6 and values["gen/generators_live"] == 3
    receiver.metrics()  # the same straggler again: named once
    assert capsys.readouterr().out.count("straggler: generator rank 3") == 1
