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

    def layout(self, layout: dict) -> None:
        """The CUSTOM SCALARS tab's layout (see monitoring.layout)."""

    def hparams(self, hparams: dict[str, float | str | bool], metrics: dict[str, float]) -> None:
        """One HParams entry: the run's config values beside its final figures."""

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

    def layout(self, layout: dict) -> None:
        self._writer.add_custom_scalars(layout)

    def hparams(self, hparams: dict[str, float | str | bool], metrics: dict[str, float]) -> None:
        # run_name "." keeps the entry beside the run's scalars instead of a timestamped subdir.
        self._writer.add_hparams(hparams, metrics, run_name=".")

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def console(message: str, role: str = "train", rank: int = 0) -> None:
    """One timestamped line on stdout, flushed so launcher logs interleave in order."""
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp} {role} rank {rank}] {message}", file=sys.stdout, flush=True)


def flat_hparams(tree: dict, prefix: str = "") -> dict[str, float | str | bool]:
    """A nested config as HParams values: dotted keys; lists and None as text."""
    flat: dict[str, float | str | bool] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat
