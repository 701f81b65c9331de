"""Probe frozen encoders: linear probe and k-NN on the configured dataset or named transfer suite
(with few-shot episodes), plus a raw-pixel baseline, written as probe.json."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from online_stablerep import atomic
from online_stablerep.config.schema import Config
from online_stablerep.eval.datasets import probe_data
from online_stablerep.eval.features import CROP_FRACTION, Encoder, extract_features_multi
from online_stablerep.eval.few_shot import draw_episodes, few_shot_accuracy
from online_stablerep.eval.knn import knn_top1
from online_stablerep.eval.linear_probe import linear_probe
from online_stablerep.eval.suites import get_suite, suite_data

# Images per feature-extraction batch.
FEATURE_BATCH_SIZE = 256
# Side of the raw-pixel baseline (3 * 16 * 16 = 768 features).
PIXELS_SIZE = 16
# Encoder name -> top-level key of probe.json for its linear top-1.
SUMMARY_KEYS = {
    "trained": "linear_top1",
    "random_init": "linear_top1_random_init",
    "pixels": "linear_top1_pixels",
}


def pixel_features(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) normalised images -> (B, 3 * 16 * 16) downsampled raw pixels."""
    small = F.interpolate(
        x, size=(PIXELS_SIZE, PIXELS_SIZE), mode="bilinear", antialias=True, align_corners=False
    )
    return small.flatten(1)


def probe_encoders(
    cfg: Config, encoders: Mapping[str, Encoder], device: torch.device | str
) -> dict[str, dict[str, float]]:
    """Linear probe and k-NN for each encoder and for raw pixels.

    Args:
        cfg: eval.* picks the dataset or suite and the sweep; model.image_size is the side
            encoders see; augment.mean/std normalise the input.
        encoders: name -> function of a normalised (B, 3, S, S) float batch on `device`
            returning (B, d) features; the caller puts models in eval mode. The name "pixels"
            is reserved for the baseline added here.
        device: where features are computed and the probes trained.

    Returns:
        {name: {"linear_top1", "knn_top1", "best_lr", "best_wd"}}, accuracies as fractions;
        with eval.suite also "fewshot_{N}way_{K}shot" and its "_ci95" for each shot count.
    """
    if "pixels" in encoders:
        raise ValueError("encoder name 'pixels' is reserved for the raw-pixel baseline")
    all_encoders: dict[str, Encoder] = {**encoders, "pixels": pixel_features}
    e, image_size = cfg.eval, cfg.model.image_size
    suite = get_suite(e.suite) if e.suite else None
    if suite is not None:
        train, test = suite_data(suite, e.cache_dir)
    else:
        train, test = probe_data(cfg, size=round(image_size / CROP_FRACTION))
    num_classes = train.num_classes

    def features(split: Any) -> dict[str, torch.Tensor]:
        total = math.ceil(len(split) / FEATURE_BATCH_SIZE)
        return extract_features_multi(
            all_encoders, split.batches(FEATURE_BATCH_SIZE), image_size,
            cfg.augment.mean, cfg.augment.std, device, total=total,
        )

    train_feats, test_feats = features(train), features(test)
    train_y, test_y = train.labels.to(device), test.labels.to(device)
    results: dict[str, dict[str, float]] = {}
    for name in tqdm(all_encoders, desc="probe", leave=False):
        train_x, test_x = train_feats[name].to(device), test_feats[name].to(device)
        linear = linear_probe(
            train_x, train_y, test_x, test_y, e.lrs, e.weight_decays, e.epochs,
            seed=cfg.seed, num_classes=num_classes,
        )
        knn = knn_top1(train_x, train_y, test_x, test_y, e.knn_k, num_classes=num_classes)
        results[name] = {
            "linear_top1": linear.top1,
            "knn_top1": knn,
            "best_lr": linear.best_lr,
            "best_wd": linear.best_wd,
        }
    if suite is not None:
        # The same episodes for every encoder: differences between encoders are paired.
        novel = list(range(suite.few_shot_first_class, suite.num_categories))
        for shots in suite.shots:
            episodes = draw_episodes(test.labels, novel, suite.ways, shots, suite.queries,
                                     suite.episodes, seed=0)
            for name in all_encoders:
                result = few_shot_accuracy(test_feats[name], train_feats[name].mean(0), episodes)
                key = f"fewshot_{suite.ways}way_{shots}shot"
                results[name][key] = result.mean
                results[name][key + "_ci95"] = result.ci95
    return results


def write_probe_json(results: Mapping[str, Mapping[str, float]], path: str | Path,
                     suite: str = "") -> dict:
    """Write probe.json atomically: per-encoder results under "encoders", plus the top-level
    summary keys (linear_top1, linear_top1_random_init, linear_top1_pixels, knn_top1) of the
    encoders present; for a named `suite`, also its name, headline metric and the trained
    encoder's few-shot figures. Returns what was written."""
    summary: dict[str, Any] = {
        key: results[name]["linear_top1"] for name, key in SUMMARY_KEYS.items() if name in results
    }
    if "trained" in results:
        summary["knn_top1"] = results["trained"]["knn_top1"]
        summary.update({key: value for key, value in results["trained"].items()
                        if key.startswith("fewshot_")})
    if suite:
        summary["suite"] = suite
        summary["headline"] = get_suite(suite).headline
    summary["encoders"] = {name: dict(values) for name, values in results.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, json.dumps(summary, indent=2) + "\n")
    return summary
