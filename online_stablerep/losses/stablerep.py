"""The training objective: the multi-positive image term, plus the image-text term of
StableRep++ when the model has a text tower. Returns named terms so the trainer can log each."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from online_stablerep.config.schema import LossConfig
from online_stablerep.losses.image_text import image_text_contrastive_loss
from online_stablerep.losses.multi_positive import multi_positive_contrastive_loss


class StableRepLoss(nn.Module):
    """total = image_weight * L_img + text_weight * L_it (the second only with text outputs).

    Args:
        loss_cfg: temperature and term weights.
        group: trainer data-parallel group the batch is gathered over (never the world group,
            which holds generator ranks too).
    """

    def __init__(self, loss_cfg: LossConfig, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.cfg = loss_cfg
        self.group = group

    def forward(
        self,
        outputs: dict[str, torch.Tensor],
        caption_ids: torch.Tensor,
        text_caption_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss terms of one batch.

        Args:
            outputs: the model's dict: image_embed (N, E) for the multi-positive term, and
                with a text tower image_text_embed (N, E), text_embed (n, E) and logit_scale
                for the image-text term.
            caption_ids: (N,) int64 caption id of each image row.
            text_caption_ids: (n,) caption id of each text row. Default: the first n entries
                of caption_ids, which for a view-major batch (records.TrainBatch) are the
                groups in order, i.e. the order of the captions given to the text tower.

        Returns:
            {"loss", "loss_img"} and "loss_text" when text_embed is present.
        """
        loss_img = multi_positive_contrastive_loss(
            outputs["image_embed"], caption_ids, self.cfg.temperature, self.group
        )
        terms = {"loss_img": loss_img}
        total = self.cfg.image_weight * loss_img
        if "text_embed" in outputs:
            text_embed = outputs["text_embed"]
            if text_caption_ids is None:
                text_caption_ids = caption_ids[: text_embed.shape[0]]
            loss_text = image_text_contrastive_loss(
                outputs["image_text_embed"],
                caption_ids,
                text_embed,
                text_caption_ids,
                outputs["logit_scale"],
                self.group,
            )
            terms["loss_text"] = loss_text
            total = total + self.cfg.text_weight * loss_text
        return {"loss": total, **terms}
