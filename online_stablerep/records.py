"""The records that move between producers, transport, replay buffer and trainer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CaptionGroup:
    """k images generated from one caption; the unit that producers make and trainers consume."""

    # Global row index of the caption in the corpus (stable across runs and ranks).
    caption_id: int
    # The caption text the images were generated from.
    caption: str
    # (k, 3, H, W) uint8 on the CPU.
    images_kchw: torch.Tensor
    # Classifier-free guidance scale used (0.0 when the producer has none).
    guidance_scale: float
    # Base seed; image j's noise derives from (seed, caption_id, j).
    seed: int
    # Global rank of the producer that made the group.
    producer_rank: int
    # time.time() when the group was made.
    created_at: float
    # Epoch of the caption stream the group was drawn in (for accounting across epochs).
    epoch: int = 0

    @property
    def num_images(self) -> int:
        return int(self.images_kchw.shape[0])

    @property
    def nbytes(self) -> int:
        return self.images_kchw.numel() * self.images_kchw.element_size()


@dataclass
class TrainBatch:
    """One trainer step's input: n caption groups x k views, laid out view-major.

    Row r = v * n + i holds view v of caption group i, so the rows of one view index form a
    contiguous chunk (the projection head's BatchNorm runs per chunk).
    """

    # (k * n, 3, H, W) uint8, view-major.
    images: torch.Tensor
    # (k * n,) int64 caption ids, view-major (same layout as images).
    caption_ids: torch.Tensor
    # n caption texts, in group order (for the StableRep++ text tower).
    captions: list[str]
    # k
    views_per_caption: int
    # n
    captions_per_batch: int
