"""The wire format of a batch of caption groups: one int64 header plus one uint8 payload.

Two flat CPU tensors per batch keep a transfer at two gloo messages whatever the number of
groups, and the header alone says how to cut the payload, so unpacking needs no other state.

Header (int64): [num_groups, extra_len, then FIELDS_PER_GROUP values per group:
caption_id, epoch, producer_rank, seed, guidance_scale (float64 bits), created_at (float64
bits), k, channels, height, width, caption byte length].
Payload (uint8): every group's images (k*C*H*W bytes each, in group order), then every
caption's UTF-8 bytes, then `extra_len` bytes of extra data (the sender's metadata).
"""

from __future__ import annotations

import numpy as np
import torch

from online_stablerep.records import CaptionGroup

FIELDS_PER_GROUP = 11
_PREAMBLE = 2


def _float_bits(value: float) -> int:
    """A float64 as the int64 with the same bits, so it crosses an int64 tensor exactly."""
    return int(np.array([value], dtype=np.float64).view(np.int64)[0])


def _bits_float(bits: int) -> float:
    return float(np.array([bits], dtype=np.int64).view(np.float64)[0])


def _as_bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(
        0, dtype=torch.uint8
    )


def pack_groups(groups: list[CaptionGroup], extra: bytes = b"") -> tuple[torch.Tensor, torch.Tensor]:
    """Pack caption groups (and opaque `extra` bytes) into (header int64, payload uint8).

    Raises:
        ValueError: when a group's images are not a (k, C, H, W) uint8 CPU tensor.
    """
    header = [len(groups), len(extra)]
    images, texts = [], []
    for group in groups:
        imgs = group.images_kchw
        if imgs.dtype != torch.uint8 or imgs.dim() != 4 or imgs.device.type != "cpu":
            raise ValueError(
                f"caption group {group.caption_id} from rank {group.producer_rank}: images must "
                f"be a (k, C, H, W) uint8 CPU tensor, got {tuple(imgs.shape)} {imgs.dtype} on "
                f"{imgs.device}"
            )
        text = group.caption.encode("utf-8")
        header += [
            group.caption_id, group.epoch, group.producer_rank, group.seed,
            _float_bits(group.guidance_scale), _float_bits(group.created_at),
            *imgs.shape, len(text),
        ]
        images.append(imgs.contiguous().reshape(-1))
        texts.append(text)
    parts = images + [_as_bytes_tensor(b"".join(texts) + extra)]
    return torch.tensor(header, dtype=torch.int64), torch.cat(parts)


def unpack_groups(header: torch.Tensor, payload: torch.Tensor) -> tuple[list[CaptionGroup], bytes]:
    """Inverse of `pack_groups`: (groups, extra bytes). Images are copies, not payload views,
    so a group kept in the replay buffer does not pin the whole batch's memory.

    Raises:
        ValueError: when the header and payload sizes disagree (a corrupt or mismatched pair).
    """
    values = header.tolist()
    num_groups, extra_len = values[0], values[1]
    fields = values[_PREAMBLE:]
    if len(fields) != num_groups * FIELDS_PER_GROUP:
        raise ValueError(
            f"wire header of {len(values)} values does not describe {num_groups} groups"
        )
    rows = [fields[i * FIELDS_PER_GROUP : (i + 1) * FIELDS_PER_GROUP] for i in range(num_groups)]
    image_bytes = sum(k * c * h * w for *_, k, c, h, w, _ in rows)
    text_bytes = sum(row[-1] for row in rows)
    if payload.numel() != image_bytes + text_bytes + extra_len:
        raise ValueError(
            f"wire payload holds {payload.numel()} bytes, header describes "
            f"{image_bytes + text_bytes + extra_len}"
        )
    raw = payload[image_bytes:].numpy().tobytes()
    groups, offset, text_offset = [], 0, 0
    for caption_id, epoch, rank, seed, guidance, created, k, c, h, w, text_len in rows:
        size = k * c * h * w
        images = payload[offset : offset + size].reshape(k, c, h, w).clone()
        caption = raw[text_offset : text_offset + text_len].decode("utf-8")
        offset += size
        text_offset += text_len
        groups.append(
            CaptionGroup(
                caption_id=caption_id,
                caption=caption,
                images_kchw=images,
                guidance_scale=_bits_float(guidance),
                seed=seed,
                producer_rank=rank,
                created_at=_bits_float(created),
                epoch=epoch,
            )
        )
    return groups, raw[text_offset : text_offset + extra_len]
