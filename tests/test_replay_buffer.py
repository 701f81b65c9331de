"""Replay buffer: capacity, reuse cap, fresh-first, distinct captions, view-major batches."""

import threading
import time

import torch

from online_stablerep.records import CaptionGroup
from online_stablerep.training.replay_buffer import ReplayBuffer


def make_group(cid: int, k: int = 4, epoch: int = 0) -> CaptionGroup:
    # Image j of caption c is filled with the value 10 * c + j, so views can be traced back.
    images = torch.stack([torch.full((3, 2, 2), 10 * cid + j, dtype=torch.uint8) for j in range(k)])
    return CaptionGroup(cid, f"caption {cid}", images, 2.0, 0, 1, time.time(), epoch)


def test_batch_layout_is_view_major_with_distinct_captions():
    buf = ReplayBuffer(capacity=8, max_reuse=1)
    buf.add([make_group(c) for c in range(3)])
    batch = buf.sample(n=3, k=2)
    assert batch.images.shape == (6, 3, 2, 2)
    assert batch.caption_ids.tolist() == [0, 1, 2, 0, 1, 2]
    for row in range(6):
        cid = batch.caption_ids[row].item()
        assert batch.images[row, 0, 0, 0].item() // 10 == cid
    # the two views of one caption are different images of the group
    assert batch.images[0, 0, 0, 0] != batch.images[3, 0, 0, 0]


def test_reuse_cap_and_fresh_first():
    buf = ReplayBuffer(capacity=8, max_reuse=2, track_keys=True)
    buf.add([make_group(c) for c in range(4)])
    first = buf.sample(2, 2).caption_ids[:2].tolist()
    second = buf.sample(2, 2).caption_ids[:2].tolist()
    assert set(first).isdisjoint(second)  # unused groups come before used ones
    buf.sample(2, 2)
    buf.sample(2, 2)
    assert buf.sample(2, 2) is None  # every group used max_reuse times and dropped
    assert max(buf.uses_by_key.values()) == 2 and len(buf) == 0
    assert buf.stats()["mean_reuse"] == 2.0


def test_duplicate_caption_ids_never_share_a_batch():
    buf = ReplayBuffer(capacity=8, max_reuse=1)
    buf.add([make_group(5, epoch=0), make_group(5, epoch=1), make_group(6)])
    assert buf.ready(2) and not buf.ready(3)
    batch = buf.sample(2, 2)
    assert sorted(batch.caption_ids[:2].tolist()) == [5, 6]


def test_capacity_evicts_most_used_first():
    buf = ReplayBuffer(capacity=3, max_reuse=5)
    buf.add([make_group(c) for c in range(3)])
    buf.sample(1, 2)  # caption 0 used once
    buf.add([make_group(9)])
    assert len(buf) == 3 and buf.evicted_unused == 0
    held = {s.group.caption_id for s in buf._slots}
    assert held == {1, 2, 9}
    buf.add([make_group(10)])
    assert buf.evicted_unused == 1


def test_wait_ready_wakes_on_add_and_close():
    buf = ReplayBuffer(capacity=4, max_reuse=1)
    threading.Timer(0.1, lambda: buf.add([make_group(1), make_group(2)])).start()
    assert buf.wait_ready(2, timeout=5)
    buf.close()
    start = time.monotonic()
    assert not buf.wait_ready(3, timeout=5)
    assert time.monotonic() - start < 1


def test_state_dict_round_trip_reproduces_draws():
    a = ReplayBuffer(capacity=8, max_reuse=3, seed=1)
    a.add([make_group(c) for c in range(5)])
    a.sample(2, 2)
    state = a.state_dict(with_contents=True)
    b = ReplayBuffer(capacity=8, max_reuse=3, seed=99)
    b.load_state_dict(state)
    for _ in range(3):
        x, y = a.sample(2, 2), b.sample(2, 2)
        assert torch.equal(x.images, y.images) and torch.equal(x.caption_ids, y.caption_ids)
