"""Image files read as square uint8 tensors: the probe's ImageFolder sets and the real images
mixed into training decode them the same way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def square_image(img: Image.Image, size: int) -> torch.Tensor:
    """(3, size, size) uint8 RGB: shorter side resized to `size`, then centre-cropped."""
    img = img.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    array = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def load_image(path: Path, size: int) -> torch.Tensor:
    """(3, size, size) uint8 of an image file (see square_image)."""
    with Image.open(path) as img:
        img.draft("RGB", (size, size))  # JPEG: decode at reduced scale when much larger
        return square_image(img, size)
