"""The fractal renderer and the procedural producer: shapes, determinism, sharding, resume, learnability."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from online_stablerep.config import load_config
from online_stablerep.eval.linear_probe import linear_probe
from online_stablerep.fractals import (
    caption_text,
    category_ifs,
    render_images,
)
from online_stablerep.producers.procedural import ProceduralProducer
from tests.helpers import render_category_images


def small_cfg(*overrides: str):
    base = [
        "producer.kind=procedural",
        "procedural.num_categories=8",
        "procedural.render_size=32",
        "procedural.num_points=1500",
        "producer.output_size=24",
        "producer.images_per_caption=3",
        "producer.captions_per_call=3",
        "producer.seed=5",
        "batch.views_per_caption=2",
        "batch.captions_per_batch=4",
    ]
    return load_config(None, overrides=base + list(overrides))


def test_groups_have_the_record_fields():
    cfg = small_cfg("train.epochs=1")
    producer = ProceduralProducer(cfg, shard=0, num_shards=1, rank=7)
    producer.start()
    groups = producer.next_groups()
    assert len(groups) == 3
    for g in groups:
        assert g.images_kchw.shape == (3, 3, 24, 24) and g.images_kchw.dtype == torch.uint8
        assert g.caption == caption_text(g.caption_id) == f"fractal {g.caption_id}"
        assert (g.guidance_scale, g.seed, g.producer_rank, g.epoch) == (0.0, 5, 7, 0)
    producer.close()


def test_maps_are_contractive_and_fill_the_canvas():
    for c in range(8):
        ifs = category_ifs(5, c, 4)
        linear = ifs.maps[:, :4].reshape(-1, 2, 2).astype(np.float64)
        assert np.linalg.norm(linear, ord=2, axis=(1, 2)).max() < 1.0
        assert ifs.cumprob[-1] == 1.0 and np.all(np.diff(ifs.cumprob) > 0)


def test_image_is_the_same_alone_or_in_a_batch():
    cfg = small_cfg()
    categories, indices = [0, 3, 3, 7, 1], [0, 4, 5, 2, 1_000_003]
    batch = render_images(cfg, categories, indices)
    for i, (c, j) in enumerate(zip(categories, indices, strict=True)):
        assert torch.equal(render_category_images(cfg, c, [j])[0], batch[i])


def test_group_images_are_indexed_by_epoch_and_position():
    cfg = small_cfg()
    producer = ProceduralProducer(cfg, shard=0, num_shards=1)
    groups = []
    while len(groups) < 12:  # 8 categories: runs into epoch 1
        groups.extend(producer.next_groups())
    for g in (groups[0], groups[-1]):
        expected = render_category_images(cfg, g.caption_id, [g.epoch * 3 + j for j in range(3)])
        assert torch.equal(g.images_kchw, expected)
    assert groups[-1].epoch == 1


def test_images_differ_within_a_group_and_across_categories():
    cfg = small_cfg()
    images = render_images(cfg, [0, 0, 0, 1, 2], [0, 1, 2, 0, 0]).float()
    for a in range(5):
        for b in range(a + 1, 5):
            assert (images[a] - images[b]).abs().mean() > 1.0
    # Bright fractal on a dark background: the brightest pixels are far above the median.
    luma = images.mean(1).flatten(1)
    assert torch.all(luma.max(1).values > luma.median(1).values + 80)


def test_shards_split_the_categories_without_overlap():
    cfg = small_cfg()
    seen = []
    for shard in range(2):
        producer = ProceduralProducer(cfg, shard=shard, num_shards=2, rank=shard, max_epochs=1)
        ids = []
        while groups := producer.next_groups():
            ids.extend(g.caption_id for g in groups)
        assert producer.next_groups() == []
        seen.append(set(ids))
        assert len(ids) == len(set(ids)) == 4
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(8))


def test_resume_continues_the_exact_stream():
    cfg = small_cfg()
    first = ProceduralProducer(cfg, shard=1, num_shards=2)
    for _ in range(2):
        first.next_groups()
    state = first.state_dict()
    expected = [first.next_groups() for _ in range(3)]
    resumed = ProceduralProducer(cfg, shard=1, num_shards=2)
    resumed.load_state_dict(state)
    got = [resumed.next_groups() for _ in range(3)]
    for exp_call, got_call in zip(expected, got, strict=True):
        for e, g in zip(exp_call, got_call, strict=True):
            assert (e.caption_id, e.epoch) == (g.caption_id, g.epoch)
            assert torch.equal(e.images_kchw, g.images_kchw)


def test_resume_rejects_another_layout():
    cfg = small_cfg()
    state = ProceduralProducer(cfg, shard=0, num_shards=2).state_dict()
    with pytest.raises(ValueError, match="shard"):
        ProceduralProducer(cfg, shard=1, num_shards=2).load_state_dict(state)


def test_pixels_separate_categories_but_do_not_solve_them():
    """Held-out renders are separable from raw pixels, yet placement jitter keeps pixels far
    from perfect (1.0 with the old small jitter), so a learned representation can beat them."""
    cfg = small_cfg("procedural.num_categories=10")
    n_train, n_test = 12, 6

    def split(first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        cats = [c for c in range(10) for _ in range(count)]
        idx = [first + j for _ in range(10) for j in range(count)]
        pixels = render_images(cfg, cats, idx).float()
        small = torch.nn.functional.interpolate(pixels, size=12, mode="area")
        return small.flatten(1), torch.tensor(cats)

    train_x, train_y = split(0, n_train)
    test_x, test_y = split(100, n_test)
    result = linear_probe(train_x, train_y, test_x, test_y, [0.1, 0.01], [0.0], epochs=30)
    assert 0.4 < result.top1 < 0.9  # chance is 0.1
