"""Replay buffer: capacity, reuse cap, random draws from a minimum pool, distinct captions,
view-major batches, mixing figures."""

import threading
import time

import pytest
import torch

from online_stablerep.records import CaptionGroup
from online_stablerep.replay import ReplayBuffer


def make_group(cid: int, k: int = 4, epoch: int = 0) -> CaptionGroup:
    # Image j of caption c is filled with the value 10 * c + j, so views can be traced back.
    images = torch.stack([torch.full((3, 2, 2), (10 * cid + j) % 256, dtype=torch.uint8) for j in range(k)])
    return CaptionGroup(cid, f"caption {cid}", images, 2.0, 0, 1, time.time(), epoch)


def test_batch_layout_is_view_major_with_distinct_captions():
    buf = ReplayBuffer(capacity=8, max_reuse=1)
    buf.add([make_group(c) for c in range(3)])
    batch = buf.sample(n=3, k=2)
    assert batch.images.shape == (6, 3, 2, 2)
    ids = batch.caption_ids.tolist()
    assert sorted(ids[:3]) == [0, 1, 2] and ids[3:] == ids[:3]
    for row in range(6):
        cid = batch.caption_ids[row].item()
        assert batch.images[row, 0, 0, 0].item() // 10 == cid
    # the two views of one caption are different images of the group
    assert batch.images[0, 0, 0, 0] != batch.images[3, 0, 0, 0]


def test_reuse_cap_drops_groups_and_drain_empties_the_pool():
    buf = ReplayBuffer(capacity=8, max_reuse=2, track_keys=True)
    buf.add([make_group(c) for c in range(4)])
    while buf.sample(2, 2) is not None:
        pass
    assert max(buf.uses_by_key.values()) == 2
    # Draws stop when fewer than 2 distinct captions remain; at most one group is left unused up.
    assert sum(buf.uses_by_key.values()) >= 6 and len(buf) <= 1


def test_fresh_weight_favours_unused_groups():
    buf = ReplayBuffer(capacity=64, max_reuse=9, fresh_weight=1e6)
    buf.add([make_group(c) for c in range(8)])
    first = buf.sample(4, 2).caption_ids[:4].tolist()
    second = buf.sample(4, 2).caption_ids[:4].tolist()
    assert set(first).isdisjoint(second)


def test_min_pool_gates_draws_until_drain():
    buf = ReplayBuffer(capacity=16, max_reuse=3, min_pool=6)
    buf.add([make_group(c) for c in range(5)])
    assert not buf.ready(2) and buf.sample(2, 2) is None
    assert buf.ready(2, drain=True) and buf.sample(2, 2, drain=True) is not None
    buf.add([make_group(9)])
    assert buf.ready(2)


def test_room_counts_only_unused_groups():
    buf = ReplayBuffer(capacity=10, max_reuse=3)
    buf.add([make_group(c) for c in range(4)])
    assert buf.room() == 6
    buf.sample(2, 2)
    assert buf.room() == 8


def test_random_draws_overlap_like_n_over_pool_and_spread_uses():
    # A pool kept at P groups (a new one arrives for each retired): a group of the previous
    # batch is drawn again with probability n / P unless that use was its last (1 / R of them
    # retire), so consecutive batches share about n / P * (1 - 1 / R) of their captions; a
    # group's R uses spread over about (R - 1) * P / n steps.
    n, pool, reuse = 8, 32, 4
    buf = ReplayBuffer(capacity=pool, max_reuse=reuse, min_pool=pool, seed=3)
    next_id = 0
    for _ in range(300):
        missing = pool - len(buf)
        buf.add([make_group(c) for c in range(next_id, next_id + missing)])
        next_id += missing
        assert buf.sample(n, 2) is not None
    stats = buf.stats()
    assert abs(stats["batch_overlap"] - n / pool * (1 - 1 / reuse)) < 0.03
    assert abs(stats["use_spread_steps"] - (reuse - 1) * pool / n) < 3
    assert stats["mean_reuse"] > reuse - 0.5


def test_sequential_draw_takes_unused_then_least_used_oldest_first():
    # The old rule, kept for the reuse experiment: with the producer topping the pool up to n,
    # batches repeat most of the previous one.
    n, reuse = 4, 3
    buf = ReplayBuffer(capacity=16, max_reuse=reuse, draw="sequential")
    buf.add([make_group(c) for c in range(6)])
    first = buf.sample(n, 2)
    assert first.caption_ids[:n].tolist() == [0, 1, 2, 3]
    second = buf.sample(n, 2)
    assert second.caption_ids[:n].tolist() == [4, 5, 0, 1]
    assert buf.stats()["batch_overlap"] == 0.5


def test_unknown_draw_is_refused():
    with pytest.raises(ValueError, match="replay.draw"):
        ReplayBuffer(capacity=4, max_reuse=2, draw="shuffled")


def test_full_pool_with_n_groups_repeats_the_whole_batch():
    buf = ReplayBuffer(capacity=4, max_reuse=10)
    buf.add([make_group(c) for c in range(4)])
    for _ in range(5):
        buf.sample(4, 2)
    assert buf.stats()["batch_overlap"] == 1.0


def test_duplicate_caption_ids_never_share_a_batch():
    buf = ReplayBuffer(capacity=8, max_reuse=1)
    buf.add([make_group(5, epoch=0), make_group(5, epoch=1), make_group(6)])
    assert buf.ready(2) and not buf.ready(3)
    batch = buf.sample(2, 2)
    assert sorted(batch.caption_ids[:2].tolist()) == [5, 6]


def test_capacity_evicts_most_used_first():
    buf = ReplayBuffer(capacity=3, max_reuse=5)
    buf.add([make_group(c) for c in range(3)])
    used = buf.sample(1, 2).caption_ids[0].item()
    buf.add([make_group(9)])
    assert len(buf) == 3 and buf.evicted_unused == 0
    held = {s.group.caption_id for s in buf._slots}
    assert held == {0, 1, 2, 9} - {used}
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


def test_image_positives_repeat_one_image_of_each_group_k_times():
    # SimCLR positives (batch.positives=image): the k rows of a group are one stored image, so
    # the trainer's per-row augmentation makes k views of it; which image varies between uses.
    buf = ReplayBuffer(capacity=8, max_reuse=50, positives="image", seed=3)
    buf.add([make_group(c, k=5) for c in range(3)])
    picked = set()
    for _ in range(40):
        batch = buf.sample(n=3, k=4)
        values = batch.images[:, 0, 0, 0].view(4, 3)  # (k, n): view-major
        assert torch.equal(values, values[:1].expand(4, 3))
        assert (values[0] // 10).tolist() == batch.caption_ids[:3].tolist()
        picked.update(values[0].tolist())
    assert picked == {10 * c + j for c in range(3) for j in range(5)}


def test_image_positives_take_groups_of_one_image():
    buf = ReplayBuffer(capacity=8, max_reuse=1, positives="image")
    buf.add([make_group(c, k=1) for c in range(2)])
    assert buf.sample(n=2, k=3).images.shape == (6, 3, 2, 2)


def test_unknown_positives_are_refused():
    with pytest.raises(ValueError, match="batch.positives"):
        ReplayBuffer(capacity=4, max_reuse=1, positives="views")
