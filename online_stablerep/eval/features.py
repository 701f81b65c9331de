"""Frozen features from uint8 images: resize, centre crop, normalise, encode.

Several encoders share one pass over the data, so an ImageFolder split is decoded once however
many encoders (trained, random init, pixels) are probed. The caller puts models in eval mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

Encoder = Callable[[torch.Tensor], torch.Tensor]
# Standard evaluation crop: resize the shorter side to image_size / 0.875, crop image_size.
CROP_FRACTION = 0.875


def preprocess(
    images_uint8: torch.Tensor,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str,
) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> (B, 3, image_size, image_size) normalised float32 on `device`."""
    x = images_uint8.to(device, non_blocking=True).float().div_(255.0)
    resize = round(image_size / CROP_FRACTION)
    h, w = x.shape[-2:]
    if min(h, w) != resize:
        scale = resize / min(h, w)
        size = (max(resize, round(h * scale)), max(resize, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    h, w = x.shape[-2:]
    top, left = (h - image_size) // 2, (w - image_size) // 2
    x = x[:, :, top : top + image_size, left : left + image_size]
    mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


@torch.no_grad()
def extract_features_multi(
    encoders: Mapping[str, Encoder],
    batches: Iterable[torch.Tensor],
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str,
    total: int | None = None,
) -> dict[str, torch.Tensor]:
    """Encode every uint8 batch with every encoder.

    Args:
        encoders: name -> function of a normalised (B, 3, S, S) batch returning (B, d) features.
        batches: (b, 3, H, W) uint8 batches.
        image_size: S, the side each encoder sees.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        device: where preprocessing and encoding run.
        total: number of batches, for the progress bar.

    Returns:
        name -> (N, d) float32 features on the CPU.
    """
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in encoders}
    for batch in tqdm(batches, total=total, desc="features", leave=False):
        x = preprocess(batch, image_size, mean, std, device)
        for name, encode in encoders.items():
            feats = encode(x)
            if feats.ndim != 2 or feats.shape[0] != x.shape[0]:
                raise ValueError(f"encoder {name!r} returned shape {tuple(feats.shape)}, "
                                 f"expected ({x.shape[0]}, d)")
            parts[name].append(feats.float().cpu())
    if not all(parts.values()):
        raise ValueError("no images to extract features from")
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


def extract_features(
    encode_fn: Encoder,
    images_uint8: torch.Tensor,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    device: torch.device | str,
) -> torch.Tensor:
    """(N, d) float32 CPU features of (N, 3, H, W) uint8 images with one encoder."""
    batches = (images_uint8[lo : lo + batch_size] for lo in range(0, len(images_uint8), batch_size))
    total = math.ceil(len(images_uint8) / batch_size)
    feats = extract_features_multi(
        {"encoder": encode_fn}, batches, image_size, mean, std, device, total=total
    )
    return feats["encoder"]
