"""The audit of what the trainer was fed (train.audit): the caption ids of every batch and the
generated groups behind them, written with the buffer's reuse counts when the run ends."""

from __future__ import annotations

import json
from pathlib import Path

from online_stablerep.records import TrainBatch
from online_stablerep.replay import ReplayBuffer


class AuditRecorder:
    """Collects every batch's caption ids and group keys; `write` leaves
    `output_dir/audit/trainer_rank{rank}.json`."""

    def __init__(self) -> None:
        # Caption ids of every batch, in group order.
        self.batches: list[list[int]] = []
        # The generated groups of each batch as (caption id, epoch, producer rank).
        self.batch_keys: list[list[tuple[int, int, int]]] = []

    def record(self, batch: TrainBatch, buffer: ReplayBuffer) -> None:
        self.batches.append(batch.caption_ids[: batch.captions_per_batch].tolist())
        self.batch_keys.append(list(buffer.last_batch_keys))

    def write(self, output_dir: str | Path, rank: int, views_per_caption: int,
              buffer: ReplayBuffer) -> None:
        stats = buffer.stats()
        audit = {
            "rank": rank,
            "batches": self.batches,
            "batch_keys": self.batch_keys,
            "views_per_caption": views_per_caption,
            "max_reuse": buffer.max_reuse,
            "uses": [[*key, uses] for key, uses in (buffer.uses_by_key or {}).items()],
            "held_unused": stats["unused"],
            "min_pool": buffer.min_pool,
            # How well batches mixed: mean fraction repeated from the previous batch, mean
            # steps between a retired group's first and last use.
            "batch_overlap": stats["batch_overlap"],
            "use_spread_steps": stats["use_spread_steps"],
            "counters": buffer.counters(),
        }
        path = Path(output_dir) / "audit" / f"trainer_rank{rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(audit))
