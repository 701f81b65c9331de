"""Weighted k-nearest-neighbour classifier on frozen features (as in DINO's evaluation).

Cosine similarity between L2-normalised features; each of the k nearest training images votes
for its class with weight exp(similarity / temperature).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# DINO's vote temperature.
KNN_TEMPERATURE = 0.07
# Test rows scored per similarity matrix (bounds memory on large training sets).
KNN_CHUNK = 256


@torch.no_grad()
def knn_predict(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    num_classes: int,
    k: int,
    temperature: float = KNN_TEMPERATURE,
) -> torch.Tensor:
    """(M,) int64 predicted classes of the test rows.

    Args:
        train_x: (N, d) features; train_y: (N,) int64 labels.
        test_x: (M, d) features.
        num_classes: number of classes.
        k: neighbours per vote (capped at N).
        temperature: vote weight exp(sim / temperature).
    """
    train_n = F.normalize(train_x.float(), dim=1)
    k = min(k, train_n.shape[0])
    preds = []
    for lo in range(0, test_x.shape[0], KNN_CHUNK):
        sims = F.normalize(test_x[lo : lo + KNN_CHUNK].float(), dim=1) @ train_n.T  # (m, N)
        top_sims, top_idx = sims.topk(k, dim=1)  # (m, k)
        weights = (top_sims / temperature).exp()
        votes = torch.zeros(sims.shape[0], num_classes, device=sims.device)
        votes.scatter_add_(1, train_y[top_idx], weights)
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_top1(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    k: int,
    num_classes: int | None = None,
    temperature: float = KNN_TEMPERATURE,
) -> float:
    """Test top-1 (fraction in [0, 1]) of the weighted k-NN classifier."""
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    preds = knn_predict(train_x, train_y, test_x, num_classes, k, temperature)
    return float((preds == test_y).float().mean())
