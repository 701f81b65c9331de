"""StableRep's multi-positive contrastive loss over the global batch of all trainer ranks.

Every row is a view of an image generated from some caption; all other rows from the same
caption are its positives. With two views per caption and distinct captions the loss is
SimCLR's NT-Xent.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F

from online_stablerep.distributed.env import get_rank, get_world_size


class _GatherRows(torch.autograd.Function):
    """All-gather with autograd that works on any subgroup: the backward all-reduces the
    gathered gradient and keeps this rank's rows. torch.distributed.nn's all_gather backward
    on gloo scatters from group ranks as if they were global ranks, which fails once the
    trainers are not global ranks 0..T-1 (generators on every node)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        ctx.rows = rows.shape[0]
        parts = [torch.empty_like(rows) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, rows.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        start = dist.get_rank(ctx.group) * ctx.rows
        return grad[start : start + ctx.rows], None


def gather_rows(
    rows: torch.Tensor, group: dist.ProcessGroup | None, with_grad: bool
) -> tuple[torch.Tensor, int]:
    """Concatenate `rows` of every rank of `group` in rank order.

    Gradients flow back to each rank's own rows when `with_grad` (the all-gather's backward
    sums every rank's gradient for them), which is what a loss over the global batch needs.

    Args:
        rows: (N_local, ...) this rank's rows; every rank must hold the same N_local.
        group: the trainer data-parallel group; None or a group of one means no gathering.
        with_grad: gather through autograd (features) or as plain data (labels).

    Returns:
        (N_global, ...) gathered rows and the offset of this rank's rows in them.
    """
    world = get_world_size(group) if group is not None else 1
    if world == 1:
        return rows, 0
    offset = get_rank(group) * rows.shape[0]
    if with_grad and dist.get_backend(group) == dist.Backend.NCCL:
        return torch.cat(dist_nn.all_gather(rows, group=group), dim=0), offset
    if with_grad:
        return _GatherRows.apply(rows, group), offset
    parts = [torch.empty_like(rows) for _ in range(world)]
    dist.all_gather(parts, rows.contiguous(), group=group)
    return torch.cat(parts, dim=0), offset


def soft_cross_entropy(
    logits: torch.Tensor, positives: torch.Tensor, what: str
) -> torch.Tensor:
    """Mean cross-entropy against targets spread uniformly over each row's positives.

    Args:
        logits: (R, C) fp32; entries that may never win (a row's own column) are -inf.
        positives: (R, C) bool; never True where logits is -inf.
        what: names the rows in the error message ("image rows", "text rows").

    Raises:
        ValueError: when a row has no positive (its target would be undefined).
    """
    counts = positives.sum(dim=1)  # (R,)
    if bool((counts == 0).any()):
        bad = torch.nonzero(counts == 0).flatten()[:8].tolist()
        raise ValueError(
            f"{what} {bad} have no positive in the batch: every caption needs at least 2 "
            "views (batch.views_per_caption >= 2) and every text a matching image"
        )
    log_prob = F.log_softmax(logits, dim=1)
    # where(), not a product: 0 * -inf would turn masked columns into NaN.
    picked = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    return -(picked / counts).mean()


def multi_positive_contrastive_loss(
    features: torch.Tensor,
    caption_ids: torch.Tensor,
    temperature: float = 0.1,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """StableRep's loss: cross-entropy of each row against a uniform target over its positives.

    Logits are f_i . f_j / temperature over every other row j of the global batch (the row
    itself is masked out); positives are the rows with the same caption id. The mask is built
    from caption ids on every call, so a caption that appears in two groups of one batch makes
    all of its rows positives (positional labels would call them negatives).

    Args:
        features: (N_local, D) embeddings of this rank's rows, any dtype; computed in fp32.
        caption_ids: (N_local,) int64 caption id of each row.
        temperature: softmax temperature tau.
        group: trainer data-parallel group to gather the batch over (None: this rank only).

    Returns:
        Scalar loss, the mean over this rank's rows. Averaging it over ranks (as DDP averages
        gradients) gives the loss of the global batch.

    Raises:
        ValueError: when shapes disagree or a row has no positive.
    """
    if features.ndim != 2 or caption_ids.shape != features.shape[:1]:
        raise ValueError(
            f"features (N, D) and caption_ids (N,) disagree: {tuple(features.shape)} vs "
            f"{tuple(caption_ids.shape)}"
        )
    local = F.normalize(features.float(), dim=1)  # (N_local, D)
    everyone, offset = gather_rows(local, group, with_grad=True)  # (N_global, D)
    all_ids, _ = gather_rows(caption_ids, group, with_grad=False)  # (N_global,)

    rows = torch.arange(local.shape[0], device=local.device)
    is_self = torch.zeros(local.shape[0], everyone.shape[0], dtype=torch.bool, device=local.device)
    is_self[rows, rows + offset] = True
    logits = (local @ everyone.T / temperature).masked_fill(is_self, float("-inf"))
    positives = (caption_ids[:, None] == all_ids[None, :]) & ~is_self
    return soft_cross_entropy(logits, positives, "image rows")
