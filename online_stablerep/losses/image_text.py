"""StableRep++'s CLIP-style image-text term with several images per caption.

Each image's positive is its caption's text; each text's positives are all images generated
from it (k of them, target 1/k each). Both directions are averaged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from online_stablerep.losses.multi_positive import gather_rows, soft_cross_entropy


def image_text_contrastive_loss(
    image_features: torch.Tensor,
    caption_ids: torch.Tensor,
    text_features: torch.Tensor,
    text_caption_ids: torch.Tensor,
    logit_scale: torch.Tensor,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Symmetric image-text contrastive loss over the global batch, in fp32.

    Positives are matched by caption id, so a caption held twice (two groups, or two ranks)
    spreads its target over every matching row instead of calling copies negatives.

    Args:
        image_features: (N_local, D) image embeddings.
        caption_ids: (N_local,) int64 caption id of each image.
        text_features: (n_local, D) embeddings of this rank's captions.
        text_caption_ids: (n_local,) int64 caption id of each text row.
        logit_scale: scalar log of the logit multiplier (the trainer clamps the parameter
            after each optimizer step, as the official code does; no clamp here).
        group: trainer data-parallel group to gather over (None: this rank only).

    Returns:
        Scalar loss: (image->text mean over local images + text->image mean over local texts) / 2.

    Raises:
        ValueError: when shapes disagree, or an image has no text or a text no image.
    """
    if caption_ids.shape != image_features.shape[:1] or (
        text_caption_ids.shape != text_features.shape[:1]
    ):
        raise ValueError(
            f"image features {tuple(image_features.shape)} / caption ids "
            f"{tuple(caption_ids.shape)} or text features {tuple(text_features.shape)} / text "
            f"caption ids {tuple(text_caption_ids.shape)} disagree"
        )
    images = F.normalize(image_features.float(), dim=1)  # (N_local, D)
    texts = F.normalize(text_features.float(), dim=1)  # (n_local, D)
    all_images, _ = gather_rows(images, group, with_grad=True)  # (N_global, D)
    all_texts, _ = gather_rows(texts, group, with_grad=True)  # (n_global, D)
    all_image_ids, _ = gather_rows(caption_ids, group, with_grad=False)  # (N_global,)
    all_text_ids, _ = gather_rows(text_caption_ids, group, with_grad=False)  # (n_global,)

    scale = logit_scale.float().exp()
    image_to_text = soft_cross_entropy(
        scale * images @ all_texts.T,  # (N_local, n_global)
        caption_ids[:, None] == all_text_ids[None, :],
        "image rows",
    )
    text_to_image = soft_cross_entropy(
        scale * texts @ all_images.T,  # (n_local, N_global)
        text_caption_ids[:, None] == all_image_ids[None, :],
        "text rows",
    )
    return (image_to_text + text_to_image) / 2
