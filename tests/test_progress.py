"""The trainer's console line (training/progress.py) and its audit file (training/audit.py), on a
real replay buffer."""

from __future__ import annotations

import json
import time

import torch

from online_stablerep.records import CaptionGroup
from online_stablerep.replay import ReplayBuffer
from online_stablerep.training.audit import AuditRecorder
from online_stablerep.training.progress import train_line


def test_train_line_names_every_figure():
    values = {"train/lr": 1.5e-4, "train/idle_fraction": 0.25, "buffer/groups": 12.0,
              "buffer/mean_reuse": 1.5, "buffer/batch_overlap": 0.1, "buffer/use_spread_steps": 3.0}
    line = train_line(7, 100, 2.345678, 321.04, values)
    assert line == ("step 7/100 loss 2.3457 lr 1.50e-04 321.0 img/s idle 25% buffer 12 "
                    "reuse 1.50 overlap 10% spread 3.0 steps")


def test_audit_records_each_batch_and_writes_the_buffer_counts(tmp_path):
    buffer = ReplayBuffer(capacity=8, max_reuse=1, track_keys=True)
    buffer.add([CaptionGroup(c, f"caption {c}", torch.zeros(2, 3, 2, 2, dtype=torch.uint8), 2.0,
                             0, 5, time.time(), 0) for c in range(4)])
    recorder = AuditRecorder()
    for _ in range(2):
        batch = buffer.sample(n=2, k=2)
        recorder.record(batch, buffer)
    recorder.write(tmp_path, 3, 2, buffer)
    audit = json.loads((tmp_path / "audit" / "trainer_rank3.json").read_text())
    assert audit["rank"] == 3 and audit["views_per_caption"] == 2
    assert sorted(c for ids in audit["batches"] for c in ids) == [0, 1, 2, 3]
    assert [[key[0] for key in keys] for keys in audit["batch_keys"]] == audit["batches"]
    assert sorted(use[0] for use in audit["uses"]) == [0, 1, 2, 3]
