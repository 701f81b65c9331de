"""Findings of the code review (issue 9, item 7), each with a test that failed before the fix:
the checkpoint snapshot of buffer and cursors, take_credit when credit vanishes, and a caption
shard too small for a batch with captions.shuffle=false."""

import queue
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from online_stablerep.distributed.roles import Roles
from online_stablerep.records import CaptionGroup
from online_stablerep.replay import ReplayBuffer
from online_stablerep.training.hybrid_source import HybridSource
from online_stablerep.transport import messages as msg
from online_stablerep.transport.messages import Kind
from online_stablerep.transport.protocol import TrainerState
from online_stablerep.transport.receiver import Receiver
from online_stablerep.transport.sender import GeneratorLink


def fake_groups(rank, trainers, generators):
    roles = Roles(world_size=len(trainers) + len(generators), num_generators=len(generators))
    assert roles.trainer_ranks == trainers and roles.generator_ranks == generators
    return SimpleNamespace(rank=rank, roles=roles, data_plane="data", control="control")


def group(caption_id):
    return CaptionGroup(caption_id=caption_id, caption=f"c{caption_id}",
                        images_kchw=torch.zeros(2, 3, 4, 4, dtype=torch.uint8),
                        guidance_scale=2.0, seed=0, producer_rank=1, created_at=0.0, epoch=0)


def cursor(seq):
    return {"seq": seq, "end": 1, "len": 1, "before": {}, "after": {"calls": seq}}


def test_checkpoint_snapshot_holds_every_group_its_cursors_count():
    buffer = ReplayBuffer(capacity=8, max_reuse=1)
    receiver = Receiver(fake_groups(0, [0], [1]), buffer, 4, timeout_s=5)
    receiver._outstanding[1] = 4
    receiver.deliver(1, [group(0)], {"cursor": cursor(1), "idle_fraction": 0,
                                     "images_per_s": 0}, 0)
    source = HybridSource(buffer, receiver, n=1, k=2, timeout_s=5)
    real_state_dict = buffer.state_dict
    arrivals = []

    def state_dict_while_a_group_arrives(with_contents):
        state = real_state_dict(with_contents)
        # The receive thread delivers the next group right after the buffer was read.
        arrival = threading.Thread(target=receiver.deliver, args=(
            1, [group(1)], {"cursor": cursor(2), "idle_fraction": 0, "images_per_s": 0}, 0))
        arrival.start()
        arrival.join(timeout=0.5)
        arrivals.append(arrival)
        return state

    buffer.state_dict = state_dict_while_a_group_arrives
    buffer_state, source_state = source.snapshot(True)
    arrivals[0].join()
    saved_ids = {slot[0].caption_id for slot in buffer_state["slots"]}
    # The cursor says how far the generator's stream was delivered; the buffer holds exactly it.
    assert saved_ids == {0}
    assert source_state["cursors"]["1"]["seq"] == 1, (
        "the cursor counts a group the buffer state does not hold")
    assert len(buffer) == 2  # the arrival went through once the snapshot was taken


class ScriptedTrainers:
    """Stands in for gloo on a generator's link: the test pushes the trainers' messages."""

    def __init__(self, monkeypatch):
        self.inbox = queue.Queue()
        self.blobs = {}
        self.sent = []
        monkeypatch.setattr(msg, "recv_message", self.recv_message)
        monkeypatch.setattr(msg, "recv_blob", self.recv_blob)
        monkeypatch.setattr(msg, "send_message", self.send_message)
        monkeypatch.setattr(msg, "send_data", lambda *a, **k: None)

    def push(self, src, kind, arg=0, blob=b""):
        self.inbox.put((src, kind, [len(blob) or arg, 0], blob))

    def recv_message(self, group, src, timeout_s):
        try:
            sender, kind, args, blob = self.inbox.get(timeout=timeout_s)
        except queue.Empty:
            raise RuntimeError("Timed out waiting") from None
        self.blobs[sender] = blob
        return sender, kind, args

    def recv_blob(self, group, src, nbytes, timeout_s):
        return self.blobs[src]

    def send_message(self, group, dst, kind, *args, blob=b"", timeout_s):
        self.sent.append((dst, kind))


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_take_credit_when_the_credit_holder_stops_meanwhile_ends_cleanly(monkeypatch):
    trainers = ScriptedTrainers(monkeypatch)
    link = GeneratorLink(fake_groups(2, [0, 1], [2]), timeout_s=5)
    trainers.push(0, Kind.START)
    trainers.push(1, Kind.START)
    link.wait_hello()
    trainers.push(0, Kind.CREDIT, 2)
    wait_for(lambda: link._credit[0] == 2)
    real_wait = link.wait_credit

    def wait_then_stop_arrives():
        # Credit was there; trainer 0 stops before it is taken (trainers ended their run).
        ok = real_wait()
        trainers.push(0, Kind.STOP)
        wait_for(lambda: link.states()[0] != TrainerState.OPEN)
        return ok

    link.wait_credit = wait_then_stop_arrives
    result = {}

    def take():
        try:
            result["taken"] = link.take_credit(2)
        except Exception as err:  # the bug: ValueError from max() of nothing
            result["error"] = err

    taker = threading.Thread(target=take)
    taker.start()
    time.sleep(0.3)
    trainers.push(0, Kind.STOP)  # harmless if already stopped
    trainers.push(1, Kind.STOP)
    taker.join(timeout=5)
    assert "error" not in result, result.get("error")
    assert result["taken"] in (None, (0, 2))
    # With every trainer stopped there is nothing left to take: None, not an exception.
    assert link.take_credit(2) is None
    link.close()


def test_unshuffled_shard_smaller_than_a_batch_fails_at_start(tmp_path):
    # Two colocated ranks split 10 captions into shards of 5; unshuffled, a shard holds the
    # same 5 captions every epoch and a batch of 8 distinct ones never fills (the source used
    # to produce forever).
    from online_stablerep.config import load_config
    from online_stablerep.jobs.preflight import InputError, check_inputs

    captions = tmp_path / "few.txt"
    captions.write_text("".join(f"caption {i}\n" for i in range(10)))
    args = [f"output_dir={tmp_path / 'run'}", "roles.generators=0", f"captions.path={captions}",
            "batch.captions_per_batch=8", "replay.capacity=64"]
    with pytest.raises(InputError, match=r"captions.shuffle=false: .*few.txt.* holds 5 captions"):
        check_inputs(load_config("cpu_demo", [*args, "captions.shuffle=false"]), world_size=2)
    # Shuffled, every epoch deals a shard other captions: batches fill.
    check_inputs(load_config("cpu_demo", [*args, "captions.shuffle=true"]), world_size=2)
