"""Real images decoded ahead of the trainer (`mix.prefetch_batches`): the same images in the same
order as decoding on the trainer's thread, the cursor of what was handed out (exact resume),
decoding off the trainer's thread, errors raised by take(), and a resumed cursor that does not
decode what it skips."""

from __future__ import annotations

import threading

import pytest

from online_stablerep.training import real_images
from online_stablerep.training.real_images import RealImageError, RealImageStream
from online_stablerep.training.real_prefetch import PrefetchedRealImages
from tests.test_mix import _encode, _image_folder, _picture, _real_shards

TEMPLATE = "a photo of a {}"


def _stream(folder, shard: int = 0, shards: int = 1, **kw) -> RealImageStream:
    return RealImageStream(str(folder), TEMPLATE, 16, shard, shards, seed=3, **kw)


def _record_decoding_threads(monkeypatch) -> list[str]:
    names: list[str] = []
    load = real_images.load_image

    def recording_load(path, size):
        names.append(threading.current_thread().name)
        return load(path, size)

    monkeypatch.setattr(real_images, "load_image", recording_load)
    return names


def test_prefetched_batches_equal_the_trainer_thread_ones_with_the_same_cursor(tmp_path):
    folder = _image_folder(tmp_path / "real", per_class=3)  # 9 images: epochs wrap
    plain, ahead = _stream(folder), PrefetchedRealImages(_stream(folder), 2, depth=2)
    try:
        for _ in range(7):
            want, got = plain.take(2), ahead.take(2)
            assert [(x.uid, x.caption) for x in got] == [(x.uid, x.caption) for x in want]
            assert all((a.image == b.image).all() for a, b in zip(got, want, strict=True))
            # The cursor of what was handed out, not of what was decoded ahead.
            assert ahead.state_dict() == plain.state_dict()
    finally:
        ahead.close()


def test_resume_from_a_prefetched_cursor_continues_the_uninterrupted_order(tmp_path):
    folder = _image_folder(tmp_path / "real", per_class=3)
    whole = PrefetchedRealImages(_stream(folder, 1, 2), 2, depth=3)
    first = [x.uid for _ in range(2) for x in whole.take(2)]
    state = whole.state_dict()
    rest = [x.uid for _ in range(4) for x in whole.take(2)]
    whole.close()
    resumed = PrefetchedRealImages(_stream(folder, 1, 2), 2, depth=3)
    resumed.load_state_dict(state)
    assert [x.uid for _ in range(4) for x in resumed.take(2)] == rest
    resumed.close()
    assert set(first + rest) <= {1, 3, 5, 7}  # this rank's share of 9


def test_close_returns_the_stream_to_the_handed_out_cursor(tmp_path):
    folder = _image_folder(tmp_path / "real", per_class=3)
    plain, ahead = _stream(folder), PrefetchedRealImages(_stream(folder), 2, depth=3)
    ahead.take(2)
    ahead.close()  # the thread had decoded batches ahead
    plain.take(2)
    assert [x.uid for x in ahead.take(2)] == [x.uid for x in plain.take(2)]
    ahead.close()


def test_images_are_decoded_off_the_trainer_thread(tmp_path, monkeypatch):
    names = _record_decoding_threads(monkeypatch)
    ahead = PrefetchedRealImages(_stream(_image_folder(tmp_path / "real")), 2, depth=2)
    ahead.take(2)
    ahead.take(2)
    ahead.close()
    assert names and set(names) == {"real-images"}


def test_a_bad_image_is_raised_by_take_naming_the_file(tmp_path):
    folder = _image_folder(tmp_path / "real", per_class=1)
    for path in folder.rglob("*.png"):
        path.write_bytes(b"not a png")
    ahead = PrefetchedRealImages(_stream(folder), 2, depth=2)
    with pytest.raises(RealImageError, match=r"cannot read image .*0\.png"):
        ahead.take(2)
    ahead.close()


def test_skipped_counts_only_batches_handed_out(tmp_path):
    samples = [{"__key__": f"s{i}", "png": _encode(_picture(i)), "txt": f"c{i}"}
               for i in range(4)]
    samples[1] = {"__key__": "junk", "png": b"not a png", "txt": "x"}
    root = _real_shards(tmp_path / "shards", samples, per_shard=4)
    ahead = PrefetchedRealImages(_stream(root, skip_bad=True), 2, depth=3)
    assert [x.caption for x in ahead.take(2)] == ["c0", "c2"]
    assert ahead.skipped == 1  # the thread has met more of them by now
    ahead.close()


def test_a_resumed_cursor_decodes_only_what_it_hands_out(tmp_path, monkeypatch):
    folder = _image_folder(tmp_path / "real", per_class=4)  # 12 images, one share
    stream = _stream(folder)
    stream.take(9)
    state = stream.state_dict()
    names = _record_decoding_threads(monkeypatch)
    resumed = _stream(folder)
    resumed.load_state_dict(state)
    resumed.take(2)
    assert len(names) == 2  # not the 9 images before the cursor


def test_prefetch_depth_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="depth"):
        PrefetchedRealImages(_stream(_image_folder(tmp_path / "real")), 2, depth=0)


def test_a_resumed_shard_cursor_continues_the_order_past_skipped_samples(tmp_path):
    samples = [{"__key__": f"s{i}", "png": _encode(_picture(i)), "txt": f"c{i}"}
               for i in range(7)]
    samples[2] = {"__key__": "junk", "png": b"not a png", "txt": "x"}
    root = _real_shards(tmp_path / "shards", samples, per_shard=3)
    stream = _stream(root, skip_bad=True)
    stream.take(3)  # c0 c1 c3: the bad sample is consumed by the cursor too
    state = stream.state_dict()
    rest = [x.caption for x in stream.take(6)]
    resumed = _stream(root, skip_bad=True)
    resumed.load_state_dict(state)
    assert [x.caption for x in resumed.take(6)] == rest == ["c4", "c5", "c6", "c0", "c1", "c3"]
