"""Evaluation: linear probe, k-NN, features, datasets and the probe.json summary."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from online_stablerep.config import load_config
from online_stablerep.eval import (
    HELD_OUT_INDEX_OFFSET,
    extract_features,
    image_folder_probe_data,
    knn_predict,
    knn_top1,
    linear_probe,
    preprocess,
    probe_encoders,
    procedural_probe_data,
    write_probe_json,
)
from online_stablerep.eval.linear_probe import stratified_split
from tests.helpers import render_category_images


def clusters(num_classes: int, per_class: int, dim: int, spread: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99)) * 3
    y = torch.arange(num_classes).repeat_interleave(per_class)
    return centres[y] + spread * torch.randn(len(y), dim, generator=gen), y


def test_linear_probe_separates_clusters():
    train_x, train_y = clusters(6, 20, 32, 0.5, seed=0)
    test_x, test_y = clusters(6, 10, 32, 0.5, seed=1)
    result = linear_probe(train_x + 100.0, train_y, test_x + 100.0, test_y, [0.1, 0.01],
                          [0.0, 1e-4], epochs=30)
    assert result.top1 >= 0.98
    assert (result.best_lr, result.best_wd) in result.val_top1
    assert len(result.val_top1) == 4


def test_linear_probe_on_random_labels_is_near_chance():
    gen = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(400, 16, generator=gen), torch.randn(400, 16, generator=gen)
    train_y = torch.randint(0, 4, (400,), generator=gen)
    test_y = torch.randint(0, 4, (400,), generator=gen)
    result = linear_probe(train_x, train_y, test_x, test_y, [0.1], [0.0], epochs=20)
    assert result.top1 < 0.35  # chance is 0.25


def test_stratified_split_puts_every_class_in_validation():
    labels = torch.arange(5).repeat_interleave(10)
    fit, val = stratified_split(labels, 0.2, seed=0)
    assert set(fit.tolist()).isdisjoint(val.tolist())
    assert sorted(fit.tolist() + val.tolist()) == list(range(50))
    assert torch.bincount(labels[val], minlength=5).tolist() == [2] * 5


def test_knn_on_a_toy_case():
    train_x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    train_y = torch.tensor([0, 0, 1, 1])
    test_x = torch.tensor([[2.0, 0.1], [0.2, 5.0]])  # cosine: the scale does not matter
    assert knn_predict(train_x, train_y, test_x, num_classes=2, k=2).tolist() == [0, 1]
    assert knn_top1(train_x, train_y, test_x, torch.tensor([0, 1]), k=3) == 1.0


def test_knn_matches_a_naive_weighted_vote():
    gen = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(300, 8, generator=gen), torch.randn(300, 8, generator=gen)
    train_y = torch.randint(0, 5, (300,), generator=gen)
    preds = knn_predict(train_x, train_y, test_x, num_classes=5, k=7, temperature=0.1)
    tn = torch.nn.functional.normalize(train_x, dim=1)
    for i in range(0, 300, 37):
        sims = tn @ torch.nn.functional.normalize(test_x[i], dim=0)
        order = sims.argsort(descending=True)[:7]
        votes = np.zeros(5)
        for j in order.tolist():
            votes[train_y[j]] += float(torch.exp(sims[j] / 0.1))
        assert preds[i] == int(votes.argmax())


def test_preprocess_resizes_crops_and_normalises():
    images = torch.full((2, 3, 40, 50), 255, dtype=torch.uint8)
    x = preprocess(images, 32, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], device="cpu")
    assert x.shape == (2, 3, 32, 32)
    assert torch.allclose(x, torch.full_like(x, 2.0), atol=1e-5)


def test_extract_features_is_batch_size_independent():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()).eval()
    images = torch.randint(0, 256, (10, 3, 20, 20), dtype=torch.uint8)
    a = extract_features(net, images, 16, [0.5] * 3, [0.5] * 3, batch_size=3, device="cpu")
    b = extract_features(net, images, 16, [0.5] * 3, [0.5] * 3, batch_size=10, device="cpu")
    assert a.shape == (10, 4 * 14 * 14)
    assert torch.allclose(a, b, atol=1e-5)


def tiny_cfg(*overrides: str):
    return load_config(None, overrides=[
        "producer.kind=procedural",
        "procedural.num_categories=6",
        "procedural.render_size=32",
        "procedural.num_points=1500",
        "producer.output_size=32",
        "producer.images_per_caption=2",
        "batch.views_per_caption=2",
        "batch.captions_per_batch=4",
        "model.image_size=24",
        "eval.train_per_class=4",
        "eval.test_per_class=2",
        "eval.epochs=10",
        "eval.knn_k=5",
        *overrides,
    ])


def test_procedural_probe_data_is_held_out():
    cfg = tiny_cfg()
    train, test = procedural_probe_data(cfg)
    assert len(train) == 24 and len(test) == 12
    assert train.labels.tolist() == [c for c in range(6) for _ in range(4)]
    expected = render_category_images(cfg, 2, [HELD_OUT_INDEX_OFFSET + 4, HELD_OUT_INDEX_OFFSET + 5])
    assert torch.equal(test.images_nchw[4:6], expected)


def write_image_folder(root, sizes=((30, 20), (16, 40))) -> None:
    colours = {"blue": (0, 0, 255), "red": (255, 0, 0)}
    for split, count in (("train", 3), ("val", 2)):
        for name, rgb in colours.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                size = sizes[i % len(sizes)]
                Image.new("RGB", size, rgb).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")


def test_image_folder_loads_uint8_squares_with_labels(tmp_path):
    write_image_folder(tmp_path)
    train, val = image_folder_probe_data(tmp_path, size=12)
    assert train.class_names == val.class_names == ["blue", "red"]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1] and val.labels.tolist() == [0, 0, 1, 1]
    images = train.load()
    assert images.shape == (6, 3, 12, 12) and images.dtype == torch.uint8
    assert torch.all(images[:3, 2].float().mean((1, 2)) > 200)  # blue class is blue
    assert torch.all(images[3:, 0].float().mean((1, 2)) > 200)
    assert [b.shape[0] for b in val.batches(3)] == [3, 1]


def test_image_folder_rejects_unknown_val_class(tmp_path):
    write_image_folder(tmp_path)
    (tmp_path / "val" / "green").mkdir()
    with pytest.raises(ValueError, match="green"):
        image_folder_probe_data(tmp_path, size=12)


def small_encoder(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
    ).eval()


def test_probe_encoders_writes_the_summary(tmp_path):
    cfg = tiny_cfg()
    results = probe_encoders(cfg, {"trained": small_encoder(0), "random_init": small_encoder(1)},
                             "cpu")
    assert set(results) == {"trained", "random_init", "pixels"}
    for values in results.values():
        assert set(values) == {"linear_top1", "knn_top1", "best_lr", "best_wd"}
        assert 0.0 <= values["linear_top1"] <= 1.0 and 0.0 <= values["knn_top1"] <= 1.0
    assert results["pixels"]["linear_top1"] > 1 / 6
    path = tmp_path / "probe.json"
    write_probe_json(results, path)
    summary = json.loads(path.read_text())
    assert summary["linear_top1"] == results["trained"]["linear_top1"]
    assert summary["linear_top1_random_init"] == results["random_init"]["linear_top1"]
    assert summary["linear_top1_pixels"] == results["pixels"]["linear_top1"]
    assert summary["knn_top1"] == results["trained"]["knn_top1"]
    assert set(summary["encoders"]) == set(results)


def test_probe_encoders_on_an_image_folder(tmp_path):
    write_image_folder(tmp_path)
    cfg = tiny_cfg(f"eval.dataset={tmp_path}")
    results = probe_encoders(cfg, {"trained": small_encoder(0)}, "cpu")
    assert results["pixels"]["linear_top1"] == 1.0  # solid colours
    write_probe_json(results, tmp_path / "probe.json")
    summary = json.loads((tmp_path / "probe.json").read_text())
    assert "linear_top1_random_init" not in summary and "linear_top1" in summary


def test_pixels_name_is_reserved():
    with pytest.raises(ValueError, match="pixels"):
        probe_encoders(tiny_cfg(), {"pixels": small_encoder(0)}, "cpu")
