"""The projection head of StableRep: a 3-layer MLP from backbone features to the embedding."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from online_stablerep.models.sync_batchnorm import SyncBatchNorm1d

HEAD_NORMS = ("mlp_bn", "mlp_ln")


class ProjectionHead(nn.Module):
    """Linear -> Norm -> ReLU -> Linear -> Norm -> ReLU -> Linear.

    "mlp_bn" is the paper's head: BatchNorm with statistics per view chunk, synchronised over
    the trainer group. "mlp_ln" swaps in LayerNorm, which has no batch statistics at all (the
    paper suspects the BatchNorm of ViT-L's instability). The Linears before a norm carry no
    bias: the norm's own shift makes it redundant.

    Args:
        in_dim: width of the backbone features.
        hidden_dim: width of the two hidden layers.
        embed_dim: width of the output embedding.
        kind: "mlp_bn" or "mlp_ln".
        group: trainer data-parallel group for BatchNorm statistics (None: per rank).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        embed_dim: int,
        kind: str = "mlp_bn",
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        if kind not in HEAD_NORMS:
            raise ValueError(f"model.head={kind!r} is not one of {', '.join(HEAD_NORMS)}")
        self.fc1 = nn.Linear(in_dim, hidden_dim, bias=False)
        self.norm1 = self._norm(kind, hidden_dim, group)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.norm2 = self._norm(kind, hidden_dim, group)
        self.fc3 = nn.Linear(hidden_dim, embed_dim)

    @staticmethod
    def _norm(kind: str, width: int, group: dist.ProcessGroup | None) -> nn.Module:
        return SyncBatchNorm1d(width, group=group) if kind == "mlp_bn" else nn.LayerNorm(width)

    def _apply_norm(self, norm: nn.Module, x: torch.Tensor, num_chunks: int) -> torch.Tensor:
        if isinstance(norm, SyncBatchNorm1d):
            return norm(x, num_chunks)
        return norm(x)

    def forward(self, features: torch.Tensor, num_chunks: int = 1) -> torch.Tensor:
        """Embed (N, in_dim) features to (N, embed_dim).

        Args:
            features: rows laid out in `num_chunks` contiguous chunks (view-major: chunk v holds
                view v of every caption); BatchNorm computes statistics per chunk.
            num_chunks: number of view chunks (k); 1 treats the batch as one.
        """
        x = torch.relu(self._apply_norm(self.norm1, self.fc1(features), num_chunks))
        x = torch.relu(self._apply_norm(self.norm2, self.fc2(x), num_chunks))
        return self.fc3(x)
