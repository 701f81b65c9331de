"""A batch source that puts real images beside the generated caption groups (`mix.*`).

A real image is a group of one image: its k rows are the same uint8 image, and the trainer's
per-row augmentation makes them k different views, SimCLR's positives. Its caption id is
-(1 + uid), which no generated caption (ids >= 0) and no other real image shares, so in the
multi-positive loss its positives are exactly its own k views and everything else in the global
batch is a negative.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch

from online_stablerep.records import TrainBatch
from online_stablerep.training.real_images import RealImage
from online_stablerep.training.sources import BatchSource


class RealImages(Protocol):
    """A resumable stream of real images: RealImageStream, or PrefetchedRealImages around it."""

    skipped: int

    def take(self, count: int) -> list[RealImage]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def real_caption_id(uid: int) -> int:
    return -(1 + uid)


class MixedSource:
    """`inner` makes n - r generated groups per batch; `real` adds r real images."""

    def __init__(self, inner: BatchSource, real: RealImages, real_per_batch: int,
                 views_per_caption: int) -> None:
        self.inner = inner
        self.buffer = inner.buffer
        self.real = real
        self.r = real_per_batch
        self.k = views_per_caption
        self._rows = 0
        self._real_rows = 0
        self._load_s = 0.0

    def next_batch(self) -> TrainBatch | None:
        generated = self.inner.next_batch()
        if generated is None:
            return None
        # With prefetching this is the trainer's wait for images decoded ahead.
        start = time.perf_counter()
        real = self.real.take(self.r)
        self._load_s += time.perf_counter() - start
        n_gen, k = generated.captions_per_batch, self.k
        # View-major layouts side by side: view v holds the generated rows, then the real ones.
        real_views = torch.stack([item.image for item in real]).unsqueeze(0).expand(k, -1, -1, -1,
                                                                                   -1)
        gen_views = generated.images.view(k, n_gen, *generated.images.shape[1:])
        images = torch.cat([gen_views, real_views], dim=1).reshape(-1, *real_views.shape[2:])
        real_ids = torch.tensor([real_caption_id(item.uid) for item in real], dtype=torch.int64)
        ids = torch.cat([generated.caption_ids.view(k, n_gen), real_ids.expand(k, -1)], dim=1)
        self._rows += images.shape[0]
        self._real_rows += k * self.r
        return TrainBatch(
            images=images.contiguous(), caption_ids=ids.reshape(-1),
            captions=generated.captions + [item.caption for item in real],
            views_per_caption=k, captions_per_batch=n_gen + self.r,
        )

    def idle_seconds(self) -> float:
        return self.inner.idle_seconds()

    def metrics(self) -> dict[str, float]:
        # The share of rows actually trained on that were real, over the run so far.
        share = self._real_rows / self._rows if self._rows else 0.0
        return {**self.inner.metrics(), "mix/real_share": share,
                "mix/real_load_s": self._load_s, "mix/skipped": float(self.real.skipped)}

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "real_images": self.real.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "real_images" not in state:
            # A checkpoint of a run without real images: they start from the beginning.
            self.inner.load_state_dict(state)
            return
        self.inner.load_state_dict(state["inner"])
        self.real.load_state_dict(state["real_images"])

    def snapshot(self, buffer_contents: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        # The cursor handed out moves only in next_batch, on the trainer's own thread (a
        # prefetching thread decodes ahead but reports the cursor of each batch it hands over).
        buffer_state, inner_state = self.inner.snapshot(buffer_contents)
        return buffer_state, {"inner": inner_state, "real_images": self.real.state_dict()}

    def abort(self, reason: str) -> None:
        """Pass a failure on to the generators (hybrid mode; nothing to do colocated)."""
        abort = getattr(self.inner, "abort", None)
        if abort is not None:
            abort(reason)

    def close(self) -> None:
        self.real.close()
        self.inner.close()
