"""The on-disk form of a caption group in WebDataset tar shards.

One sample per group, its members named `<key>.<field>` as WebDataset expects (the key ends at
the first dot): `<key>.0.png` ... `<key>.{m-1}.png` (or .jpg/.webp), `<key>.txt` (the caption)
and `<key>.json` (caption id, caption, epoch, guidance scale, seed, producer rank, number of
images, format). The json goes last, so a sample whose json is present is complete. The key is
`e{epoch}-c{caption_id}`: a group is a pure function of (seed, epoch, caption id), so a group
made again after a resume has the key of the one already written and is skipped.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from online_stablerep.records import CaptionGroup

# PNG at zlib level 1: lossless at any level; level 6 (PIL's default) measured 2.2x slower to
# encode for 16% smaller files (256 px renders), and encoding is the writer's main cost.
_PNG_LEVEL = 1
# PIL's names of the image formats shards.image_format allows.
_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
IMAGE_EXTENSIONS = tuple(_PIL_FORMATS)
# Metadata every sample's json must hold.
REQUIRED_META = ("caption_id", "caption", "epoch", "guidance_scale", "seed", "producer_rank",
                 "num_images", "image_format")


class ShardError(ValueError):
    """A shard or one of its samples cannot be read; the message names the file and key."""


def sample_key(epoch: int, caption_id: int) -> str:
    """The deterministic key of a group (no dots: WebDataset splits the key at the first)."""
    return f"e{epoch}-c{caption_id}"


def encode_group(group: CaptionGroup, image_format: str, quality: int) -> dict[str, bytes]:
    """A group's members, field -> bytes, in writing order (images, txt, json last)."""
    fields: dict[str, bytes] = {}
    pil_format = _PIL_FORMATS[image_format]
    options = {"compress_level": _PNG_LEVEL} if image_format == "png" else {"quality": quality}
    pixels = group.images_kchw.permute(0, 2, 3, 1).contiguous().numpy()  # (k, H, W, 3)
    for j, image in enumerate(pixels):
        buffer = io.BytesIO()
        Image.fromarray(image, "RGB").save(buffer, format=pil_format, **options)
        fields[f"{j}.{image_format}"] = buffer.getvalue()
    fields["txt"] = group.caption.encode("utf-8")
    meta = {"caption_id": group.caption_id, "caption": group.caption, "epoch": group.epoch,
            "guidance_scale": group.guidance_scale, "seed": group.seed,
            "producer_rank": group.producer_rank, "num_images": group.num_images,
            "image_format": image_format}
    fields["json"] = json.dumps(meta).encode("utf-8")
    return fields


def add_sample(tar: tarfile.TarFile, key: str, fields: dict[str, bytes], mtime: float) -> None:
    """Append one sample's members to an open tar."""
    for field, data in fields.items():
        info = tarfile.TarInfo(f"{key}.{field}")
        info.size = len(data)
        info.mtime = int(mtime)
        info.mode = 0o444
        tar.addfile(info, io.BytesIO(data))


def split_name(name: str) -> tuple[str, str]:
    """(key, field) of a member name, as WebDataset splits it (at the first dot of the base)."""
    directory, _, base = name.rpartition("/")
    key, dot, field = base.partition(".")
    return (f"{directory}/{key}" if directory else key), (field if dot else "")


def iter_samples(path: Path, complete_only: bool = False) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, fields) of each sample of a tar, members grouped by key in file order.

    Args:
        complete_only: read a shard that may end mid-sample (a leftover `.tmp`): stop quietly
            at the first damage and yield only samples whose json was written.

    Raises:
        ShardError: the file is not a readable tar (names it and the last good key).
    """
    key, fields, last = None, {}, "(none)"
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, field = split_name(member.name)
                if member_key != key:
                    if key is not None and (not complete_only or "json" in fields):
                        yield key, fields
                        last = key
                    key, fields = member_key, {}
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError(f"{member.name} is truncated")
                fields[field] = data
    except (tarfile.TarError, OSError, EOFError) as err:
        if complete_only:
            return
        raise ShardError(f"shard {path}: not a readable tar after sample {last!r} ({err})") from None
    if key is not None and (not complete_only or "json" in fields):
        yield key, fields


def scan_keys(path: Path) -> list[str]:
    """Keys of a complete shard's samples, from the tar headers only (data is skipped)."""
    try:
        with tarfile.open(path, "r:") as tar:
            keys = dict.fromkeys(split_name(m.name)[0] for m in tar if m.isfile())
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ShardError(f"shard {path}: not a readable tar ({err})") from None
    return list(keys)


def _decode_image(data: bytes, size: int, resize: bool, where: str) -> torch.Tensor:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:  # PIL raises many types for bad bytes
        raise ShardError(f"{where}: undecodable image ({type(err).__name__}: {err})") from None
    # Grayscale converts without loss or choice; an alpha channel would need a background.
    if image.mode == "L":
        image = image.convert("RGB")
    if image.mode != "RGB":
        raise ShardError(f"{where}: image mode {image.mode} (need RGB or grayscale L; convert "
                         "the shard's images to RGB)")
    if image.size != (size, size):
        if not resize:
            raise ShardError(f"{where}: image is {image.size[0]}x{image.size[1]}, "
                             f"producer.output_size={size} (set producer.output_size to the "
                             "stored size, or shards.resize=true)")
        image = ImageOps.fit(image, (size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def decode_sample(
    path: Path, key: str, fields: dict[str, bytes], size: int, resize: bool, min_images: int,
) -> tuple[dict[str, Any], torch.Tensor]:
    """(metadata, (m, 3, size, size) uint8 images) of one sample.

    Raises:
        ShardError: a missing or bad member, naming the file and key.
    """
    where = f"shard {path}, sample {key!r}"
    if "json" not in fields:
        raise ShardError(f"{where}: no json member (metadata), has {sorted(fields)}")
    try:
        meta = json.loads(fields["json"])
    except ValueError as err:
        raise ShardError(f"{where}: unreadable json ({err})") from None
    missing = [name for name in REQUIRED_META if name not in meta]
    if missing:
        raise ShardError(f"{where}: json lacks {', '.join(missing)}")
    m, ext = int(meta["num_images"]), meta["image_format"]
    if m < min_images:
        raise ShardError(f"{where}: {m} images, batch.views_per_caption={min_images} needs more")
    absent = [f"{j}.{ext}" for j in range(m) if f"{j}.{ext}" not in fields]
    if absent:
        raise ShardError(f"{where}: missing image member(s) {', '.join(absent)}")
    images = [_decode_image(fields[f"{j}.{ext}"], size, resize, f"{where}, image {j}.{ext}")
              for j in range(m)]
    return meta, torch.stack(images)
