"""Benchmark scripts at tiny sizes: they run, and write the results files the planner reads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.common import Timing, machine_name, plot_lines, time_it, write_results

ROOT = Path(__file__).resolve().parents[1]


def test_timing_statistics_and_results_files(tmp_path):
    timing = Timing([4.0, 1.0, 2.0, 3.0, 5.0])
    assert timing.median == 3.0 and timing.quantile(0.25) == 2.0 and timing.quantile(0.75) == 4.0
    assert timing.rates(6.0, "images_per_s") == {
        "images_per_s": 2.0, "images_per_s_p25": 1.5, "images_per_s_p75": 3.0}
    calls = []
    timed = time_it(lambda: calls.append(1), torch.device("cpu"), warmup=2, reps=3)
    assert len(calls) == 5 and len(timed.seconds) == 3

    rows = [{"batch": 1, "images_per_s": 2.0}, {"batch": 2, "images_per_s": 3.5, "extra": "x"}]
    paths = write_results("demo", torch.device("cpu"), {"steps": 4}, {"images_per_s": 3.5},
                          rows, tmp_path)
    assert paths["json"].name == f"demo-{machine_name(torch.device('cpu'))}.json"
    document = json.loads(paths["json"].read_text())
    assert document["benchmark"] == "demo" and document["rows"] == rows
    assert {"machine", "device", "torch", "date", "settings", "summary"} <= set(document)
    assert paths["csv"].read_text().splitlines()[0] == "batch,images_per_s,extra"
    png = plot_lines(tmp_path / "demo.png", "demo", "batch", "images/s", [1, 2],
                     {"ours": [2.0, 3.5]}, {"ours": [(1.8, 2.2), (3.0, 4.0)]})
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_trainer_benchmark_runs_both_loops(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "trainer.py"), "--backbones", "resnet10t",
         "--image-size", "32", "--input-size", "32", "--captions", "4", "--views", "2",
         "--warmup", "1", "--reps", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    document = json.loads(next(tmp_path.glob("trainer-*.json")).read_text())
    engines = {row["engine"]: row for row in document["rows"]}
    assert set(engines) == {"deepspeed", "plain"}
    for row in engines.values():
        assert row["repetitions"] == 2 and row["images_per_s"] > 0
        assert row["flops_per_step"] > 0 and row["mfu"] is None  # no peak for a CPU
    ratio = document["summary"]["by_backbone"]["resnet10t"]["deepspeed_over_plain"]
    assert ratio == pytest.approx(engines["deepspeed"]["images_per_s"]
                                  / engines["plain"]["images_per_s"])
    assert next(tmp_path.glob("trainer-*.png")).stat().st_size > 0
    assert "deepspeed / plain" in result.stdout


@pytest.mark.slow
def test_generator_benchmark_writes_recipe_and_lever_rows(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "generator.py"), "--scenarios",
         "stock,stock_ddim50,ours,paper_eager,dpm20_eager,fast_eager,deep_cache_2",
         "--warmup", "0", "--reps", "1",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    document = json.loads(next(tmp_path.glob("generator-*.json")).read_text())
    rows = {row["scenario"]: row for row in document["rows"]}
    assert set(rows) == {"stock", "stock_ddim50", "ours", "paper_eager", "dpm20_eager",
                         "fast_eager", "deep_cache_2"}
    for row in rows.values():
        assert row["images_per_s"] > 0 and 0 < row["fraction_of_flop_limit"] < 1
        assert row["repetitions"] == 1 and row["diversity"] >= 0
    assert rows["stock"]["speedup_vs_stock"] == 1.0
    fast = rows["fast_eager"]
    assert (fast["recipe"], fast["steps"], fast["guided_steps"], fast["base_steps"]) == (
        "fast", 4, 1, 1)
    assert fast["flops_per_image"] < rows["ours"]["flops_per_image"] / 5
    assert document["summary"]["levers"].keys() == {"ours", "deep_cache_2"}
    # The paper recipe is DDIM 50 and is compared with the stock pipeline at the same sampler.
    paper, dpm20 = rows["paper_eager"], rows["dpm20_eager"]
    assert (paper["scheduler"], paper["steps"], dpm20["scheduler"], dpm20["steps"]) == (
        "ddim", 50, "dpm++", 20)
    assert paper["speedup_vs_stock_same_sampler"] == pytest.approx(
        paper["images_per_s"] / rows["stock_ddim50"]["images_per_s"])
    assert paper["flops_per_image"] > 2 * dpm20["flops_per_image"]
    assert next(tmp_path.glob("generator-*.png")).stat().st_size > 0


def test_real_mix_benchmark_compares_both_modes(tmp_path):
    from benchmarks import real_mix

    assert real_mix.main(["--warmup", "1", "--reps", "2", "--blocks", "1", "--real", "2",
                          "--rows", "8", "--output-size", "32", "--out", str(tmp_path)]) == 0
    document = json.loads(next(tmp_path.glob("real-mix-*.json")).read_text())
    modes = {row["mode"]: row for row in document["rows"]}
    assert {m: r["prefetch_batches"] for m, r in modes.items()} == {
        "trainer_thread": 0, "prefetch": 2}
    for row in modes.values():
        assert row["repetitions"] == 2 and row["steps_per_s"] > 0 and row["wait_ms_per_step"] >= 0
    assert document["summary"]["prefetch_over_trainer_thread"] == pytest.approx(
        modes["prefetch"]["steps_per_s"] / modes["trainer_thread"]["steps_per_s"])
