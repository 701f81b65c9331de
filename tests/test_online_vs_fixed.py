"""benchmarks/online_vs_fixed.py: its bookkeeping (set sizes, budget steps, confidence
intervals) and, slow, its --quick mode running every arm end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import online_vs_fixed as bench

ROOT = Path(__file__).resolve().parents[1]


def test_fixed_sets_use_each_image_about_as_often_as_asked():
    # 150 steps x 32 views: 4800 views; 9 uses -> 533 images -> 56 groups of 10 (whole batches).
    assert bench.fixed_groups(150, 9) == 56
    assert bench.fixed_groups(150, 27) == 16
    assert bench.fixed_groups(12, 27) == bench.N  # never fewer captions than a batch


def test_budget_steps_match_the_fixed_arms_total_cost():
    cost = {"image_h100_s_paper": 0.1, "view_h100_s": 0.001}
    steps = bench.budget_steps("paper", 150, 560, cost)
    fixed = 560 * 0.1 + 150 * 32 * 0.001
    per_step = 32 * (0.1 + 0.001)
    assert steps * per_step <= fixed < (steps + 1) * per_step


def test_t95_is_students_interval():
    assert bench.t95([0.5]) == 0.0
    # two values 0.4, 0.6: stdev 0.1414, t(1) 12.706 -> 12.706 * 0.1414 / sqrt(2) = 1.2706
    assert bench.t95([0.4, 0.6]) == pytest.approx(1.2706, rel=1e-3)


def test_every_arm_has_valid_overrides(tmp_path):
    from online_stablerep.config import load_config

    for arm in bench.ARMS:
        overrides = bench.arm_overrides(arm, 1, 20, tmp_path, "toy")
        cfg = load_config("cpu_demo", overrides)
        assert cfg.batch.positives == arm.positives and cfg.train.steps == 20
        assert cfg.eval.suite == bench.SUITE
        expected = {"online": "shards", "fixed": "shards", "real": "procedural"}[arm.source]
        assert cfg.producer.kind == expected


@pytest.mark.slow
def test_quick_mode_runs_every_arm_and_writes_the_table(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "benchmarks/online_vs_fixed.py", "--quick", "--jobs", "2",
         "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    document = json.loads((tmp_path / "out" / "online_vs_fixed.json").read_text())
    assert document["failures"] == []
    rows = {row["arm"]: row for row in document["rows"]}
    assert set(rows) == {arm.name for arm in bench.ARMS}
    for name, row in rows.items():
        assert 0.0 <= row["linear_top1"] <= 1.0 and row["cost_paper_h100_s"] > 0, name
    steps = document["settings"]["steps"]
    assert rows["online_r1"]["steps"] == steps
    # Fresh images: one generated image per view; replay: about R times fewer.
    assert rows["online_r1"]["images_generated"] >= rows["online_r1"]["views_trained"]
    assert rows["online_r9"]["images_generated"] < rows["online_r3"]["images_generated"] \
        < rows["online_r1"]["images_generated"]
    assert rows["fixed_small"]["images_generated"] <= rows["fixed_equal"]["images_generated"]
    assert rows["simclr_real"]["images_generated"] == 0 and rows["simclr_real"]["real_images"] > 0
    # The paper recipe's images cost hundreds of views: generation dominates online_r1.
    assert rows["online_r1"]["gen_share_paper"] > 0.99
    assert rows["online_r1_budget_paper"]["steps"] < steps
    assert (tmp_path / "out" / "online_vs_fixed.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "out" / "online_vs_fixed.csv").read_text().startswith("arm,")
