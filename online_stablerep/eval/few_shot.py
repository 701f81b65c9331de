"""Few-shot episodes on frozen features: N-way K-shot nearest-prototype classification.

The classifier is SimpleShot's (Wang et al. 2019, "CL2N"): features are centred by the mean of a
base set (the suite's train split), L2-normalised, and each query goes to the class whose
support mean is nearest in cosine similarity. It has no hyper-parameter to tune, so the figure
is the features', and 600 episodes cost milliseconds. Episodes are drawn from a fixed seed, so
every encoder is scored on the same episodes (paired comparisons).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Two-sided 95% normal quantile for the confidence interval of a mean over episodes.
Z95 = 1.96


@dataclass(frozen=True)
class Episodes:
    """Indices into a labelled set for E episodes of `ways` classes."""

    support: torch.Tensor  # (E, ways, shots) int64
    query: torch.Tensor  # (E, ways, queries) int64


@dataclass(frozen=True)
class FewShotResult:
    """Accuracy over episodes."""

    # Mean query accuracy (fraction in [0, 1]).
    mean: float
    # Half-width of the 95% confidence interval of the mean.
    ci95: float
    episodes: int


def draw_episodes(labels: torch.Tensor, classes: list[int], ways: int, shots: int, queries: int,
                  episodes: int, seed: int) -> Episodes:
    """Draw episodes: `ways` distinct classes of `classes`, then shots + queries distinct images
    of each.

    Raises:
        ValueError: when fewer than `ways` classes are given or a class has fewer than
            shots + queries images.
    """
    if len(classes) < ways:
        raise ValueError(f"few-shot: {len(classes)} classes cannot make {ways}-way episodes")
    members = {c: torch.nonzero(labels == c).flatten() for c in classes}
    short = [c for c, idx in members.items() if idx.numel() < shots + queries]
    if short:
        raise ValueError(f"few-shot: class {short[0]} has {members[short[0]].numel()} images, "
                         f"{shots}-shot episodes with {queries} queries need {shots + queries}")
    gen = torch.Generator().manual_seed(seed)
    class_t = torch.tensor(classes)
    support = torch.empty(episodes, ways, shots, dtype=torch.long)
    query = torch.empty(episodes, ways, queries, dtype=torch.long)
    for e in range(episodes):
        chosen = class_t[torch.randperm(len(classes), generator=gen)[:ways]]
        for w, c in enumerate(chosen.tolist()):
            idx = members[c][torch.randperm(members[c].numel(), generator=gen)[:shots + queries]]
            support[e, w], query[e, w] = idx[:shots], idx[shots:]
    return Episodes(support, query)


def few_shot_accuracy(features: torch.Tensor, base_mean: torch.Tensor,
                      episodes: Episodes) -> FewShotResult:
    """Nearest-prototype accuracy of `episodes` on (N, d) features.

    Args:
        features: (N, d) features of the set the episodes index.
        base_mean: (d,) mean feature of the base set, subtracted before normalising.
        episodes: from `draw_episodes`.
    """
    x = F.normalize(features.float() - base_mean.float(), dim=1)
    num, ways, queries = episodes.query.shape
    prototypes = F.normalize(x[episodes.support].mean(2), dim=2)  # (E, ways, d)
    q = x[episodes.query].reshape(num, ways * queries, -1)  # (E, ways * queries, d)
    pred = torch.bmm(q, prototypes.transpose(1, 2)).argmax(2)  # (E, ways * queries)
    truth = torch.arange(ways).repeat_interleave(queries)
    per_episode = (pred == truth).float().mean(1)  # (E,)
    std = float(per_episode.std()) if num > 1 else 0.0
    return FewShotResult(float(per_episode.mean()), Z95 * std / math.sqrt(num), num)
