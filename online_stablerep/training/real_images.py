"""Real image-caption pairs mixed into trainer batches (`mix.*`): an ImageFolder root, captions
made from folder names, or WebDataset shards of an image and a "txt" caption per sample.

Each trainer rank reads its own share (every num_shards-th image), in a fresh seeded order per
epoch for an ImageFolder and in stored order for shards; its cursor (epoch, position;
producers/cursor.py) goes into checkpoints so a resumed run continues where it stopped.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from online_stablerep.images import IMAGE_EXTENSIONS, load_image, square_image
from online_stablerep.producers.cursor import Epoch, EpochStream, Position, SkipBad, Unreadable
from online_stablerep.producers.shards import shard_files
from online_stablerep.shards.format import ShardError, iter_samples

SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SHARD_CAPTION_KEY = "txt"


class RealImageError(ValueError):
    """A real image source that cannot be read; the message names the file (and sample key)."""


@dataclass
class RealImage:
    # (3, S, S) uint8.
    image: torch.Tensor
    caption: str
    # Index of the image in the whole source (the same on every rank): unique per image.
    uid: int


def is_image_folder(path: str) -> bool:
    root = Path(path).expanduser()
    return root.is_dir() and any(p.is_dir() for p in root.iterdir())


class ImageFolderSource:
    """<root>/<class>/<image>; caption = template filled with the class folder's name."""

    def __init__(self, root: str, template: str) -> None:
        self.root = Path(root).expanduser()
        self.items: list[tuple[Path, str]] = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            caption = template.format(folder.name.replace("_", " "))
            self.items += [(f, caption) for f in sorted(folder.iterdir())
                           if f.suffix.lower() in IMAGE_EXTENSIONS]
        if not self.items:
            raise RealImageError(
                f"mix.real_path={root!r}: no images in its class folders (extensions "
                f"{', '.join(IMAGE_EXTENSIONS)})")

    def __len__(self) -> int:
        return len(self.items)

    def epoch(self, epoch: int, shard: int, num_shards: int, seed: int, size: int,
              start: int = 0) -> Epoch[RealImage]:
        """Share `shard` of `num_shards` of the images, in an order drawn from (seed, epoch)."""
        mine = list(range(shard, len(self.items), num_shards))
        random.Random(seed * 1_000_003 + epoch).shuffle(mine)
        for index in range(start, len(mine)):
            path, caption = self.items[mine[index]]
            try:
                image = load_image(path, size)
            except OSError as err:
                yield (index + 1,), Unreadable(
                    RealImageError(f"mix.real_path: cannot read image {path}: {err}"))
                continue
            yield (index + 1,), RealImage(image, caption, mine[index])


def shard_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of each sample of one tar (the shard writer's reader: WebDataset's
    grouping of members by key)."""
    try:
        yield from iter_samples(path)
    except ShardError as err:
        raise RealImageError(f"mix.real_path: {err}") from None


def decode_shard_sample(path: Path, key: str, sample: dict[str, bytes],
                        size: int) -> tuple[torch.Tensor, str]:
    """(image, caption) of one real shard sample.

    Raises:
        RealImageError: naming the shard and sample key when the image or caption is missing
            or the image cannot be decoded.
    """
    image_key = next((k for k in SHARD_IMAGE_KEYS if k in sample), None)
    if image_key is None or SHARD_CAPTION_KEY not in sample:
        raise RealImageError(
            f"mix.real_path: shard {path} sample {key!r} has keys {sorted(sample)}: need an "
            f"image ({'/'.join(SHARD_IMAGE_KEYS)}) and a caption ({SHARD_CAPTION_KEY})")
    try:
        with Image.open(io.BytesIO(sample[image_key])) as img:
            image = square_image(img, size)
    except OSError as err:
        raise RealImageError(
            f"mix.real_path: shard {path} sample {key!r}: cannot decode {image_key}: {err}"
        ) from None
    return image, sample[SHARD_CAPTION_KEY].decode("utf-8").strip()


class ShardSource:
    """WebDataset tar shards with an image and a "txt" caption per sample."""

    def __init__(self, path: str) -> None:
        self.files = shard_files(path)
        if not self.files:
            raise RealImageError(f"mix.real_path={path!r}: no .tar shards there")

    def epoch(self, epoch: int, shard: int, num_shards: int, seed: int, size: int,
              start: int = 0) -> Epoch[RealImage]:
        """Share `shard` of `num_shards` of the samples (every num_shards-th), in stored order
        (the same every epoch)."""
        uid, index = 0, 0  # index: of this share's samples, in stored order
        for path in self.files:
            samples = shard_samples(path)
            while True:
                try:
                    key, sample = next(samples)
                except StopIteration:
                    break
                except RealImageError as err:  # the unreadable rest of a corrupt shard
                    yield (max(index, start),), Unreadable(err)
                    break
                if uid % num_shards == shard:
                    index += 1
                    # Samples before the resumed cursor are read past, not decoded.
                    if index > start:
                        try:
                            image, caption = decode_shard_sample(path, key, sample, size)
                        except RealImageError as err:
                            yield (index,), Unreadable(err)
                        else:
                            yield (index,), RealImage(image, caption, uid)
                uid += 1


class RealImageStream(EpochStream[RealImage]):
    """This trainer rank's endless stream of real images, epoch after epoch, resumable (the
    cursor and the policy for unreadable samples are producers/cursor.py's)."""

    def __init__(self, path: str, template: str, size: int, shard: int, num_shards: int,
                 seed: int, skip_bad: bool = False, rank: int = 0) -> None:
        """`shard` of `num_shards`: this trainer's index among the trainers; `rank`: its global
        rank (in log lines)."""
        super().__init__("real images", {"shard": shard, "num_shards": num_shards, "seed": seed},
                         "the same trainer ranks and seed",
                         skip=SkipBad("mix.skip_bad_samples", skip_bad, "mix", rank))
        self.source = ImageFolderSource(path, template) if is_image_folder(path) else (
            ShardSource(path))
        self.size, self.shard, self.num_shards, self.seed = size, shard, num_shards, seed

    def _epoch(self, epoch: int, start: Position) -> Epoch[RealImage]:
        return self.source.epoch(epoch, self.shard, self.num_shards, self.seed, self.size,
                                 start=start[0])

    def _empty_epoch(self) -> Exception:
        return RealImageError(
            f"mix.real_path: trainer share {self.shard} of {self.num_shards} holds no image: "
            "give more images than trainer ranks")
