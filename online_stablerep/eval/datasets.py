"""Labelled image sets for the probe, as uint8 batches.

Two sources: the procedural held-out set (renders that training never produces) and an
ImageFolder root in the ImageNet layout (`train/<class>/*.jpg`, `val/<class>/*.jpg`). ImageFolder
images are decoded, resized and centre-cropped one by one while batches are drawn, so a large
dataset is never held in memory at full resolution.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from online_stablerep.config.schema import Config
from online_stablerep.fractals import HELD_OUT_INDEX_OFFSET, render_images
from online_stablerep.images import IMAGE_EXTENSIONS, load_image


class TensorImages:
    """An in-memory labelled set."""

    def __init__(self, images_nchw: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
        if images_nchw.dtype != torch.uint8 or images_nchw.ndim != 4:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {images_nchw.dtype} "
                             f"{tuple(images_nchw.shape)}")
        if labels.shape != (images_nchw.shape[0],):
            raise ValueError(f"{images_nchw.shape[0]} images but labels of shape "
                             f"{tuple(labels.shape)}")
        self.images_nchw = images_nchw
        self.labels = labels.long()
        self.num_classes = num_classes

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """(b, 3, H, W) uint8 batches in label order."""
        for lo in range(0, len(self), batch_size):
            yield self.images_nchw[lo : lo + batch_size]


class ImageFolderImages:
    """One split of an ImageFolder root, decoded lazily while batches are drawn."""

    def __init__(self, split_dir: Path, size: int, class_names: list[str] | None = None) -> None:
        """Scan `split_dir/<class>/<image>`.

        Args:
            split_dir: e.g. `root/train`.
            size: side of the square uint8 images yielded.
            class_names: the label order (the train split's); None takes the sorted subfolders.
        """
        if not split_dir.is_dir():
            raise ValueError(f"ImageFolder split not found: {split_dir}")
        found = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
        self.class_names = found if class_names is None else class_names
        index = {name: i for i, name in enumerate(self.class_names)}
        unknown = [name for name in found if name not in index]
        if unknown:
            raise ValueError(f"{split_dir}: classes {unknown[:5]} are not in the train split")
        self.paths: list[Path] = []
        labels: list[int] = []
        for name in found:
            files = sorted(
                p for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
            )
            self.paths.extend(files)
            labels.extend([index[name]] * len(files))
        if not self.paths:
            raise ValueError(f"{split_dir}: no images (extensions {', '.join(IMAGE_EXTENSIONS)})")
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.num_classes = len(self.class_names)
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """(b, 3, size, size) uint8 batches in label order, decoded on the fly."""
        for lo in range(0, len(self.paths), batch_size):
            yield torch.stack([load_image(p, self.size) for p in self.paths[lo : lo + batch_size]])

    def load(self) -> torch.Tensor:
        """All images as one (N, 3, size, size) uint8 tensor (small datasets only)."""
        return torch.cat(list(self.batches(256)))


ProbeImages = TensorImages | ImageFolderImages


def procedural_probe_data(cfg: Config) -> tuple[TensorImages, TensorImages]:
    """Held-out renders of every category: (train, test) with eval.train_per_class and
    eval.test_per_class images each, at producer.output_size."""
    num_classes = cfg.procedural.num_categories
    n_train, n_test = cfg.eval.train_per_class, cfg.eval.test_per_class

    def split(first: int, count: int) -> TensorImages:
        categories = [c for c in range(num_classes) for _ in range(count)]
        indices = [HELD_OUT_INDEX_OFFSET + first + j for _ in range(num_classes) for j in range(count)]
        images = render_images(cfg, categories, indices)
        return TensorImages(images, torch.tensor(categories), num_classes)

    return split(0, n_train), split(n_train, n_test)


def image_folder_probe_data(root: str | Path, size: int) -> tuple[ImageFolderImages, ImageFolderImages]:
    """(train, val) splits of an ImageNet-layout root; val uses the train split's labels."""
    root = Path(root)
    train = ImageFolderImages(root / "train", size)
    return train, ImageFolderImages(root / "val", size, class_names=train.class_names)


def check_probe_data(cfg: Config) -> None:
    """Raise ValueError naming eval.dataset when it is a folder without train/ and val/ (a
    suite, when set, replaces it and is checked by the config)."""
    if cfg.eval.suite or cfg.eval.dataset == "procedural":
        return
    for split in ("train", "val"):
        if not (Path(cfg.eval.dataset) / split).is_dir():
            raise ValueError(f"eval.dataset={cfg.eval.dataset!r}: no {split}/ folder there "
                             "(give an ImageFolder root with train/ and val/, 'procedural', "
                             "or --suite NAME)")


def probe_data(cfg: Config, size: int) -> tuple[ProbeImages, ProbeImages]:
    """(train, test) for eval.dataset; `size` is the ImageFolder load size (procedural images
    come at producer.output_size)."""
    if cfg.eval.dataset == "procedural":
        return procedural_probe_data(cfg)
    return image_folder_probe_data(cfg.eval.dataset, size)
