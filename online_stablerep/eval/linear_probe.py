"""Linear probe on frozen features with a small hyper-parameter sweep.

Features are standardised with the training set's statistics. Every (lr, weight decay) setting
trains its own linear head on the same minibatches (one data pass serves the whole sweep) with
SGD + momentum and a cosine schedule. The best setting on a validation split carved from the
training set is retrained on the whole training set and scored on the test set, so the test set
never picks a hyper-parameter.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Minibatch size of probe training.
PROBE_BATCH_SIZE = 256
MOMENTUM = 0.9
# Fraction of each class's training images held out to choose the hyper-parameters.
VAL_FRACTION = 0.2


@dataclass
class LinearProbeResult:
    """Outcome of `linear_probe`."""

    # Test top-1 (fraction in [0, 1]) of the chosen setting retrained on the full train set.
    top1: float
    best_lr: float
    best_wd: float
    # Validation top-1 of every (lr, wd) setting.
    val_top1: dict[tuple[float, float], float] = field(default_factory=dict)


def standardize(
    train_x: torch.Tensor, *others: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Shift and scale every feature by the training set's mean and std (constant ones kept)."""
    mean = train_x.mean(0, keepdim=True)
    std = train_x.std(0, keepdim=True).clamp_min(1e-6)
    return tuple((x - mean) / std for x in (train_x, *others))


def stratified_split(
    labels: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_idx, val_idx): `fraction` of each class (at least one where the class has two or
    more images) goes to validation."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(labels.shape[0], generator=gen)
    val_parts, train_parts = [], []
    for c in torch.unique(labels).tolist():
        members = perm[labels[perm] == c]
        n_val = max(1, int(fraction * len(members))) if len(members) >= 2 else 0
        val_parts.append(members[:n_val])
        train_parts.append(members[n_val:])
    return torch.cat(train_parts), torch.cat(val_parts)


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose argmax is the label."""
    return float((logits.argmax(1) == labels).float().mean())


def train_heads(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    settings: Sequence[tuple[float, float]],
    epochs: int,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One linear head per (lr, weight decay) setting, trained on the same minibatches.

    The heads are stacked into one weight so each step is one matmul for the whole sweep (small
    per-head matmuls are dominated by overhead on CPU). SGD with momentum, written out because
    the learning rate and weight decay differ per head.

    Args:
        x: (N, d) standardised features.
        y: (N,) int64 labels in [0, num_classes).
        num_classes: C, output width of each head.
        settings: H (lr, weight_decay) pairs.
        epochs: passes over the data.
        seed: shuffling seed.

    Returns:
        weight (d, H, C) and bias (H, C); head h's logits are x @ weight[:, h] + bias[h].
    """
    num_heads, dim = len(settings), x.shape[1]
    weight = torch.zeros(dim, num_heads * num_classes, device=x.device, requires_grad=True)
    bias = torch.zeros(num_heads * num_classes, device=x.device, requires_grad=True)
    lr = torch.tensor([s[0] for s in settings], device=x.device).repeat_interleave(num_classes)
    wd = torch.tensor([s[1] for s in settings], device=x.device).repeat_interleave(num_classes)
    momentum = [torch.zeros_like(weight), torch.zeros_like(bias)]
    batch_size = min(PROBE_BATCH_SIZE, x.shape[0])
    total_steps = epochs * math.ceil(x.shape[0] / batch_size)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
        for lo in range(0, x.shape[0], batch_size):
            idx = perm[lo : lo + batch_size]
            with torch.enable_grad():
                logits = (x[idx] @ weight + bias).view(-1, num_classes)  # (b * H, C)
                # Mean over b * H rows times H = the sum of the H heads' mean losses.
                loss = F.cross_entropy(logits, y[idx].repeat_interleave(num_heads)) * num_heads
                grad_w, grad_b = torch.autograd.grad(loss, [weight, bias])
            scale = 0.5 * (1 + math.cos(math.pi * step / total_steps))  # cosine schedule
            with torch.no_grad():
                for param, grad, buf in ((weight, grad_w, momentum[0]), (bias, grad_b, momentum[1])):
                    buf.mul_(MOMENTUM).add_(grad + wd * param)
                    param.sub_(scale * lr * buf)
            step += 1
    return weight.detach().view(dim, num_heads, num_classes), bias.detach().view(num_heads, num_classes)


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    epochs: int,
    seed: int = 0,
    num_classes: int | None = None,
) -> LinearProbeResult:
    """Sweep (lr, wd) on a validation split of the train set, retrain the best on all of it,
    and report its test top-1.

    Args:
        train_x: (N, d) features; train_y: (N,) int64 labels.
        test_x: (M, d) features; test_y: (M,) int64 labels.
        lrs: learning rates swept.
        weight_decays: weight decays swept.
        epochs: passes over the training data per head.
        seed: split and shuffling seed.
        num_classes: head width; None takes the largest label + 1.
    """
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    settings = list(itertools.product(lrs, weight_decays))
    fit_idx, val_idx = stratified_split(train_y.cpu(), VAL_FRACTION, seed)
    if val_idx.numel() == 0:
        raise ValueError("linear probe: no class has 2 training images, so no validation split "
                         "can choose the hyper-parameters (raise eval.train_per_class)")
    fit_idx, val_idx = fit_idx.to(train_x.device), val_idx.to(train_x.device)
    # 1. Sweep: standardise by the fitting part only, so validation is honest.
    fit_x, val_x = standardize(train_x[fit_idx], train_x[val_idx])
    weight, bias = train_heads(fit_x, train_y[fit_idx], num_classes, settings, epochs, seed)
    val_logits = torch.einsum("nd,dhc->nhc", val_x, weight) + bias  # (n_val, H, C)
    val_top1 = {s: top1(val_logits[:, h], train_y[val_idx]) for h, s in enumerate(settings)}
    best_lr, best_wd = max(settings, key=lambda s: val_top1[s])  # first of equals wins
    # 2. Retrain the chosen setting on the whole train set; score it on the test set.
    all_x, test_std = standardize(train_x, test_x)
    weight, bias = train_heads(all_x, train_y, num_classes, [(best_lr, best_wd)], epochs, seed)
    test_top1 = top1(test_std @ weight[:, 0] + bias[0], test_y)
    return LinearProbeResult(test_top1, best_lr, best_wd, val_top1)
