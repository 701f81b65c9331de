"""A generator's recoverable errors (issue 24), on the real diffusion producer (tiny architecture)
with faults injected through ONLINE_STABLEREP_INJECT (online_stablerep/faults.py): an
out-of-memory call is retried in halves and gives the same groups; a caption that still does not
fit, or whose images come out non-finite, is skipped and counted; the producer goes on."""

import dataclasses

import pytest

from online_stablerep.faults import ENV, injected
from online_stablerep.producers import build_producer
from tests.test_diffusion import _cfg


def made(tmp_path, monkeypatch, inject: str):
    monkeypatch.setenv(ENV, inject)
    cfg = _cfg(tmp_path, captions_per_call=4, images_per_caption=2)
    cfg.captions = dataclasses.replace(cfg.captions, shuffle=False)  # captions 0..3
    producer = build_producer(cfg, shard=0, num_shards=1, device="cpu")
    producer.start()
    groups = {g.caption_id: g for g in producer.next_groups()}
    producer.close()
    return producer, groups


@pytest.mark.slow
def test_out_of_memory_is_retried_in_halves_with_the_same_groups(tmp_path, monkeypatch):
    _, plain = made(tmp_path, monkeypatch, "")
    producer, split = made(tmp_path, monkeypatch, "oom_above=1")
    assert split.keys() == plain.keys() == {0, 1, 2, 3}
    for caption_id, group in split.items():
        diff = (group.images_kchw.int() - plain[caption_id].images_kchw.int()).abs().max()
        assert diff <= 1, caption_id  # per-image seeds: the split changes nothing
    # 4 -> 2 + 2 -> four single calls: three splits; nothing skipped.
    assert producer.retries == 3 and producer.skipped == {"out_of_memory": 0, "non_finite": 0}


@pytest.mark.slow
@pytest.mark.parametrize("inject, cause", [("oom_caption=2", "out_of_memory"),
                                           ("nonfinite_caption=2", "non_finite")])
def test_a_caption_that_cannot_be_made_is_skipped_and_counted(tmp_path, monkeypatch, inject,
                                                              cause):
    producer, groups = made(tmp_path, monkeypatch, inject)
    assert sorted(groups) == [0, 1, 3]
    assert producer.skipped[cause] == 1 and sum(producer.skipped.values()) == 1
    for group in groups.values():
        assert group.images_kchw.float().std() > 1


def test_an_unknown_injection_fails_naming_it(monkeypatch):
    monkeypatch.setenv(ENV, "oom_everywhere=1")
    with pytest.raises(ValueError, match="oom_everywhere"):
        injected()
