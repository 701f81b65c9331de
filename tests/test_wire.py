"""The wire format round-trips caption groups exactly (bits of floats, unicode text, shapes)."""

from __future__ import annotations

import pytest
import torch

from online_stablerep.records import CaptionGroup
from online_stablerep.transport.wire import pack_groups, unpack_groups


def make_group(caption_id: int, caption: str, k: int, size: int, seed: int) -> CaptionGroup:
    g = torch.Generator().manual_seed(seed)
    return CaptionGroup(
        caption_id=caption_id,
        caption=caption,
        images_kchw=torch.randint(0, 256, (k, 3, size, size), generator=g, dtype=torch.uint8),
        guidance_scale=2.0 + 1 / 3,
        seed=seed,
        producer_rank=3,
        created_at=1.7e9 + 0.123456789,
        epoch=caption_id % 3,
    )


def assert_same(a: CaptionGroup, b: CaptionGroup) -> None:
    assert (a.caption_id, a.caption, a.seed, a.producer_rank, a.epoch) == (
        b.caption_id, b.caption, b.seed, b.producer_rank, b.epoch)
    # Floats travel as their bits: equal, not close.
    assert a.guidance_scale == b.guidance_scale and a.created_at == b.created_at
    assert a.images_kchw.shape == b.images_kchw.shape
    assert torch.equal(a.images_kchw, b.images_kchw)


def test_round_trip_unicode_and_mixed_shapes():
    groups = [
        make_group(0, "a cat on a mat", 4, 8, 0),
        make_group(10**12, "ein Hund 🐕 im Schnee — ünïcödé 日本語", 2, 16, 1),
        make_group(7, "", 3, 5, 2),
    ]
    extra = '{"cursor": "é"}'.encode()
    header, payload = pack_groups(groups, extra)
    assert header.dtype == torch.int64 and payload.dtype == torch.uint8
    out, out_extra = unpack_groups(header, payload)
    assert out_extra == extra
    assert len(out) == len(groups)
    for a, b in zip(groups, out, strict=True):
        assert_same(a, b)
    # Unpacked images own their memory (do not pin the payload).
    assert out[0].images_kchw.untyped_storage().data_ptr() != payload.untyped_storage().data_ptr()


def test_empty_batch_round_trips():
    header, payload = pack_groups([], b"meta")
    groups, extra = unpack_groups(header, payload)
    assert groups == [] and extra == b"meta"


def test_rejects_non_uint8_images():
    group = make_group(1, "x", 2, 4, 0)
    group.images_kchw = group.images_kchw.float()
    with pytest.raises(ValueError, match="uint8"):
        pack_groups([group])


def test_detects_mismatched_payload():
    header, payload = pack_groups([make_group(1, "x", 2, 4, 0)])
    with pytest.raises(ValueError, match="payload"):
        unpack_groups(header, payload[:-1])
