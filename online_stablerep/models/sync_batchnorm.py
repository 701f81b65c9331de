"""BatchNorm1d with statistics per view chunk, synchronised over a process group.

torch.nn.SyncBatchNorm refuses CPU tensors once a process group exists, and it cannot compute
separate statistics for each view chunk of a batch. This module does both on any device: the
chunk sums are all-reduced through autograd, so gradients also see the global statistics.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import nn

from online_stablerep.distributed.env import get_world_size


class SyncBatchNorm1d(nn.BatchNorm1d):
    """nn.BatchNorm1d whose training statistics come from each of `num_chunks` row chunks,
    pooled over the ranks of `group`.

    With `group` None (or a group of one) and one chunk it computes what nn.BatchNorm1d does,
    running statistics included; parameters and buffers carry the same names, so state dicts
    are interchangeable.

    Args:
        num_features: C, the feature width.
        group: process group to pool statistics over; None keeps them per rank.
        eps: added to the variance before the square root.
        momentum: weight of the new batch in the running statistics.
    """

    def __init__(
        self,
        num_features: int,
        group: dist.ProcessGroup | None = None,
        eps: float = 1e-5,
        momentum: float = 0.1,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.group = group

    def forward(self, x: torch.Tensor, num_chunks: int = 1) -> torch.Tensor:
        """Normalise (N, C) rows; in training each contiguous chunk of N / num_chunks rows uses
        its own statistics (pooled over the group), as if BatchNorm ran on each chunk alone.

        Raises:
            ValueError: when N is not a multiple of num_chunks, or a chunk holds one row in all.
        """
        if x.ndim != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected (N, {self.num_features}) input, got {tuple(x.shape)}")
        if not self.training:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                self.eps,
            )
        if x.shape[0] % num_chunks:
            raise ValueError(f"{x.shape[0]} rows do not split into {num_chunks} chunks")
        world = get_world_size(self.group) if self.group is not None else 1
        chunks = x.float().reshape(num_chunks, -1, self.num_features)  # (k, n, C)
        count = chunks.shape[1] * world
        if count < 2:
            raise ValueError("BatchNorm needs more than one row per chunk to compute a variance")

        # Two passes (mean, then centred squares) keep the variance accurate in fp32.
        sums = chunks.sum(dim=1)  # (k, C)
        if world > 1:
            sums = dist_nn.all_reduce(sums, group=self.group)
        mean = sums / count
        centred = chunks - mean[:, None, :]  # (k, n, C)
        squares = centred.square().sum(dim=1)  # (k, C)
        if world > 1:
            squares = dist_nn.all_reduce(squares, group=self.group)
        var = squares / count  # biased, as BatchNorm normalises with

        self._update_running_stats(mean.detach(), var.detach() * count / (count - 1))
        out = centred * torch.rsqrt(var + self.eps)[:, None, :] * self.weight.float() + (
            self.bias.float()
        )
        return out.reshape(x.shape).to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean_kc: torch.Tensor, unbiased_var_kc: torch.Tensor) -> None:
        # One update per chunk, in order: the same as calling BatchNorm on each chunk in turn.
        for mean, var in zip(mean_kc, unbiased_var_kc, strict=True):
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(var.to(self.running_var.dtype), self.momentum)
        self.num_batches_tracked.add_(mean_kc.shape[0])
