"""The StableRep model: a timm backbone, the projection head, and StableRep++'s optional text
tower with its own linear image projection and learnable logit scale."""

from __future__ import annotations

import math

import timm
import torch
import torch.distributed as dist
from torch import nn

from online_stablerep.config.schema import ModelConfig
from online_stablerep.models.head import ProjectionHead

# CLIP's initial temperature 0.07, stored as a log so the optimiser can move it freely.
LOGIT_SCALE_INIT = math.log(1 / 0.07)
# The official code clamps the parameter to [0, log 100] after each optimizer step (a clamp
# inside the forward would zero its gradient for good once it reached the bound).
LOGIT_SCALE_MAX = math.log(100.0)


def build_backbone(name: str, image_size: int, drop_path_rate: float) -> nn.Module:
    """Random-init timm model `name` returning pooled features (CLS token for a ViT).

    Models that take an input size (ViTs: their position embedding depends on it) are built
    for `image_size`; convolutional models take any size and refuse the argument, which is
    how they are told apart.

    Raises:
        ValueError: when timm knows no model called `name`.
    """
    if not timm.is_model(name):
        raise ValueError(f"model.backbone={name!r} is not a timm model name")
    kwargs = dict(pretrained=False, num_classes=0, drop_path_rate=drop_path_rate)
    try:
        return timm.create_model(name, img_size=image_size, **kwargs)
    except TypeError as error:
        if "img_size" not in str(error):
            raise
    return timm.create_model(name, **kwargs)


class StableRepModel(nn.Module):
    """Backbone + projection head (+ text tower, image projection and logit scale for
    StableRep++).

    The image-text term uses its own linear projection of the backbone features (the official
    StableRepMM's `image_projection`), not the BatchNorm MLP head the multi-positive term uses.

    Args:
        backbone: maps (N, 3, S, S) images to (N, D) features and exposes `num_features`.
        head: maps (N, D) features to (N, E) embeddings, BatchNorm per view chunk.
        text_tower: maps (n, L) tokens to (n, T) embeddings (its own text projection last),
            or None.
        image_text_dim: T, the width of the image-text space (with a text tower).
    """

    def __init__(
        self, backbone: nn.Module, head: ProjectionHead, text_tower: nn.Module | None = None,
        image_text_dim: int = 0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.text_tower = text_tower
        self.image_projection: nn.Linear | None = None
        self.logit_scale: nn.Parameter | None = None
        if text_tower is not None:
            width = backbone.num_features
            self.image_projection = nn.Linear(width, image_text_dim, bias=False)
            nn.init.normal_(self.image_projection.weight, std=width**-0.5)
            self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Clamp the logit scale to [0, log 100]; the trainer calls it after each step."""
        if self.logit_scale is not None:
            self.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(N, D) backbone features of normalised (N, 3, S, S) images: what probes evaluate."""
        return self.backbone(images)

    def forward(
        self,
        images: torch.Tensor,
        views_per_caption: int,
        text_tokens: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Embed a view-major batch (row v * n + i = view v of caption i, see TrainBatch).

        Args:
            images: (N, 3, S, S) normalised views, N = k * n.
            views_per_caption: k; the head's BatchNorm uses one chunk of n rows per view.
            text_tokens: (n, L) tokens of the n captions in group order (StableRep++ only).

        Returns:
            image_embed (N, E) from the head; with text tokens also image_text_embed (N, T)
            (the linear image projection), text_embed (n, T) and logit_scale (a scalar, the
            log of the logit multiplier).

        Raises:
            ValueError: when N is not a multiple of k, or text tokens come without a tower.
        """
        if views_per_caption < 1 or images.shape[0] % views_per_caption:
            raise ValueError(
                f"batch of {images.shape[0]} rows does not split into {views_per_caption} views"
            )
        features = self.encode_image(images)
        outputs = {"image_embed": self.head(features, views_per_caption)}
        if text_tokens is not None:
            if self.text_tower is None:
                raise ValueError("text tokens given but model.text_tower is false")
            outputs["image_text_embed"] = self.image_projection(features)
            outputs["text_embed"] = self.text_tower(text_tokens)
            outputs["logit_scale"] = self.logit_scale
        return outputs


def build_model(m: ModelConfig, group: dist.ProcessGroup | None = None) -> StableRepModel:
    """The model that the model section `m` describes, with random weights.

    Args:
        m: the config's model section.
        group: trainer data-parallel group the head's BatchNorm synchronises over.
    """
    backbone = build_backbone(m.backbone, m.image_size, m.drop_path_rate)
    head = ProjectionHead(backbone.num_features, m.head_hidden_dim, m.embed_dim, m.head, group)
    text_tower = None
    if m.text_tower:
        # open_clip costs about 2 s to import: only StableRep++ runs pay for it.
        from online_stablerep.models.text import build_text_tower

        text_tower = build_text_tower(m)
    return StableRepModel(backbone, head, text_tower, m.image_text_dim)
