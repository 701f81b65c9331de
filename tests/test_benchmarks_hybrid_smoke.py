"""The transport and hybrid-job benchmarks at tiny sizes: they run end to end and write the
results files with the figures the issues ask for."""

import json

import pytest

from benchmarks import hybrid, transport
from benchmarks.common import machine_name

pytestmark = pytest.mark.slow


def _document(out, name):
    import torch

    document = json.loads((out / f"{name}-{machine_name(torch.device('cpu'))}.json").read_text())
    assert (out / f"{name}-{machine_name(torch.device('cpu'))}.csv").exists()
    assert (out / f"{name}-{machine_name(torch.device('cpu'))}.png").read_bytes()[:4] == b"\x89PNG"
    return document


def test_steady_rate_counts_whole_calls_after_the_warm_up():
    # Calls of 10 images every second; the warm-up hides the slow first call.
    trace = [(0.0, 0), (3.0, 10), (4.0, 20), (5.0, 30), (6.0, 40), (7.0, 50)]
    steady = hybrid.steady_rate(trace, warmup_s=3.5, chunk_s=1.0)
    assert steady.rate == 10.0 and steady.chunks == [10.0, 10.0, 10.0]
    assert (steady.t0, steady.t1) == (4.0, 7.0)
    with pytest.raises(ValueError, match="warm-up"):
        hybrid.steady_rate(trace, warmup_s=6.5, chunk_s=1.0)


def test_transport_benchmark_writes_rates_for_both_modes(tmp_path):
    assert transport.main(["--k", "2", "--groups", "1,3", "--size", "16", "--rep-mb", "0.02",
                           "--warmup", "1", "--reps", "2", "--out", str(tmp_path)]) == 0
    document = _document(tmp_path, "transport")
    assert {(r["mode"], r["groups"]) for r in document["rows"]} == {
        ("wire", 1), ("wire", 3), ("link", 1), ("link", 3)}
    for row in document["rows"]:
        assert row["MB_per_s"] > 0 and row["groups_per_s"] > 0 and row["repetitions"] == 2
    assert {"link_MB_per_s_max", "wire_MB_per_s_max", "load_avg_before"} <= set(
        document["summary"])


def test_hybrid_benchmark_reports_the_queue_cost(tmp_path):
    argv = ["--producers", "procedural", "--no-splits", "--once", "--scale", "0.3",
            "--set", "procedural.num_points=3000",
            "--out", str(tmp_path)]
    assert hybrid.main(argv) == 0
    document = _document(tmp_path, "hybrid")
    (row,) = document["rows"]
    for key in ("gen_images_per_s", "standalone_images_per_s", "train_images_per_s"):
        assert row[key] > 0
    for key in ("train_idle_fraction", "gen_idle_fraction", "gen_cpu_share"):
        assert 0 <= row[key] <= 1.5
    assert row["mean_reuse"] == pytest.approx(1.0)
    summary = document["summary"]
    assert summary["procedural_hybrid_over_standalone"] == pytest.approx(
        row["gen_images_per_s"] / row["standalone_images_per_s"])
    assert {"procedural_hybrid_over_standalone_per_cpu_s", "load_avg_before",
            "load_avg_after"} <= set(summary)
