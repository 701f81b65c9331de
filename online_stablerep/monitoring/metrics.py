"""Metric sinks: a no-op default and one TensorBoard writer per role and rank that logs."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch


class MetricSink:
    """Accepts scalars and image grids and drops them (ranks that do not log)."""

    def scalars(self, values: dict[str, float], step: int) -> None:
        pass

    def image(self, tag: str, image_chw: torch.Tensor, step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardSink(MetricSink):
    """Writes to `log_dir` (one writer per stream: the caller picks a directory per role)."""

    def __init__(self, log_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, step)

    def image(self, tag: str, image_chw: torch.Tensor, step: int) -> None:
        """`image_chw`: (3, H, W) uint8 or float in [0, 1]."""
        self._writer.add_image(tag, image_chw, step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def console(message: str, role: str = "train", rank: int = 0) -> None:
    """One timestamped line on stdout, flushed so launcher logs interleave in order."""
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp} {role} rank {rank}] {message}", file=sys.stdout, flush=True)


def group_grid(images_kchw_list: list[torch.Tensor], pad: int = 2) -> torch.Tensor:
    """A grid with one caption group per row: list of (k, 3, H, W) uint8 -> (3, H', W') uint8."""
    rows = []
    for images in images_kchw_list:
        k, c, h, w = images.shape
        row = torch.zeros(c, h + 2 * pad, k * (w + pad) + pad, dtype=torch.uint8)
        for j in range(k):
            x = pad + j * (w + pad)
            row[:, pad : pad + h, x : x + w] = images[j]
        rows.append(row)
    width = max(r.shape[2] for r in rows)
    rows = [torch.nn.functional.pad(r, (0, width - r.shape[2])) for r in rows]
    return torch.cat(rows, dim=1)
