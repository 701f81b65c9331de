"""Learning-rate schedule and the sharded caption stream."""

import pytest

from online_stablerep.producers.stream import CaptionStream
from online_stablerep.training.schedule import lr_factor


def test_warmup_then_cosine():
    assert lr_factor(0, 10, 100, 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.0) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100, 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_shards_cover_each_epoch_without_overlap_or_gap():
    shards = [CaptionStream(103, s, 4, seed=3, max_epochs=2) for s in range(4)]
    taken = [s.take(1000) for s in shards]
    for epoch in range(2):
        ids = [c for t in taken for (e, c) in t if e == epoch]
        assert sorted(ids) == list(range(103))
    assert all(s.exhausted for s in shards)


def test_epochs_reshuffle_and_cursor_resumes():
    a = CaptionStream(50, 0, 1, seed=0)
    first = a.take(50)
    second = a.take(50)
    assert [c for _, c in first] != [c for _, c in second]
    b = CaptionStream(50, 0, 1, seed=0)
    b.take(30)
    state = b.state_dict()
    c = CaptionStream(50, 0, 1, seed=0)
    c.load_state_dict(state)
    assert c.take(40) == b.take(40)


def test_cursor_from_another_corpus_is_refused():
    state = CaptionStream(50, 0, 1).state_dict()
    with pytest.raises(ValueError, match="num_items"):
        CaptionStream(60, 0, 1).load_state_dict(state)
