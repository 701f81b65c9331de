"""The hybrid job with real processes on gloo: generator ranks feed trainer ranks.

Accounting comes from `train.audit=true`: trainers write every batch's caption ids and each
group's use count, generators every group they sent.
"""

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.helpers import (
    TINY_PROCEDURAL,
    batch_overlap,
    read_logs,
    read_summary,
    start_ranks,
    tensorboard_tags,
    wait_all,
)

pytestmark = pytest.mark.slow

N, K, R = 8, 2, 2


def job_args(out: Path, generators: int, *extra: str) -> list[str]:
    return ["--config", "cpu_procedural", f"output_dir={out}", *TINY_PROCEDURAL,
            f"roles.generators={generators}", f"batch.captions_per_batch={N}",
            f"batch.views_per_caption={K}", f"replay.max_reuse={R}", "replay.capacity=16",
            "replay.min_pool=16",
            "producer.captions_per_call=4", "transport.credits_per_generator=4",
            "train.audit=true", "transport.timeout_s=60", *extra]


def check_accounting(out: Path, trainers: int, generators: int) -> None:
    audit = out / "audit"
    sent = set()
    for g in range(trainers, trainers + generators):
        sent |= {tuple(key) for key in json.loads((audit / f"generator_rank{g}.json").read_text())["sent"]}
    received_total = 0
    for t in range(trainers):
        a = json.loads((audit / f"trainer_rank{t}.json").read_text())
        for ids in a["batches"]:
            assert len(ids) == N and len(set(ids)) == N  # n distinct caption groups per batch
        uses = {tuple(u[:3]): u[3] for u in a["uses"]}
        assert max(uses.values()) <= R  # no group used more than R times
        assert set(uses) <= sent  # everything trained on was made by a generator
        counters = a["counters"]
        assert counters["evicted_unused"] == 0
        # every group a trainer received was trained on or is still held unused
        assert counters["groups_added"] == len(uses) + a["held_unused"]
        received_total += counters["groups_added"]
        # Random draws from a pool of 16 repeat at most about n / P * (1 - 1 / R) = 1/4 of a
        # batch; fast generators replace used groups sooner, so less (a bound, not a value).
        expected = N / 16 * (1 - 1 / R)
        overlap = batch_overlap(a["batch_keys"])
        assert overlap < expected + 0.15, (overlap, expected, a["batch_keys"])
        assert a["batch_overlap"] == pytest.approx(batch_overlap(a["batch_keys"]))
    # only groups in flight at the stop can be lost: bounded by the credit granted
    assert 0 <= len(sent) - received_total <= 4 * trainers * generators


@pytest.mark.parametrize("trainers, generators", [(1, 2), (2, 1)])
def test_hybrid_job_trains_on_every_batch_shape_and_accounts_for_groups(tmp_path, trainers, generators):
    out = tmp_path / "run"
    procs = start_ranks(trainers + generators, job_args(out, generators, "train.steps=16"), tmp_path / "logs")
    codes = wait_all(procs, timeout=240)
    assert codes == [0] * len(procs), read_logs(tmp_path / "logs")[-4000:]
    check_accounting(out, trainers, generators)
    losses = read_summary(out)["losses"]
    assert len(losses) == 16 and all(map(lambda x: x == x and abs(x) < 1e6, losses))
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4  # learning with the procedural producer (n=8: a clear margin over 16 steps)
    tags = tensorboard_tags(out / "tensorboard" / "train")
    for tag in ("train/loss", "train/lr", "train/images_per_s", "train/idle_fraction",
                "buffer/groups", "buffer/mean_reuse", "buffer/age_s", "gen/images_per_s",
                "gen/idle_fraction", "transport/MB_per_s", "buffer/received_groups",
                *(f"gen/images_per_s/rank{g}" for g in range(trainers, trainers + generators))):
        assert tag in tags, tag


def test_killed_generator_stops_every_rank_and_resume_works(tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    args = job_args(out, 2, "train.steps=400", "train.checkpoint_every=3", "transport.timeout_s=20")
    procs = start_ranks(3, args, logs)
    deadline = time.monotonic() + 180
    while not list((out / "checkpoints").glob("step_*/meta.json")):
        assert time.monotonic() < deadline, read_logs(logs)[-3000:]
        assert all(p.poll() is None for p in procs), read_logs(logs)[-3000:]
        time.sleep(0.5)
    os.kill(procs[2].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    codes = wait_all(procs[:2], timeout=60)
    assert time.monotonic() - killed_at < 45  # within transport.timeout_s plus teardown
    assert codes == [1, 1], read_logs(logs)[-4000:]
    assert "rank 2" in (logs / "rank0.log").read_text()
    # the newest complete checkpoint survived; a resumed job continues from it
    done = sorted(int(p.parent.name[5:]) for p in (out / "checkpoints").glob("step_*/meta.json"))
    resumed = start_ranks(3, job_args(out, 2, f"train.steps={done[-1] + 3}", "resume=true"),
                          tmp_path / "logs2")
    codes = wait_all(resumed, timeout=180)
    assert codes == [0, 0, 0], read_logs(tmp_path / "logs2")[-4000:]
    assert "resumed from" in (tmp_path / "logs2" / "rank0.log").read_text()
    assert read_summary(out)["steps"] == done[-1] + 3


def test_sigterm_on_the_trainer_stops_every_rank_cleanly_with_a_checkpoint(tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    procs = start_ranks(2, job_args(out, 1, "train.steps=100000", "transport.timeout_s=30"), logs)
    deadline = time.monotonic() + 120
    while "step 1/" not in (logs / "rank0.log").read_text():
        assert time.monotonic() < deadline and procs[0].poll() is None, read_logs(logs)[-3000:]
        time.sleep(0.5)
    procs[0].send_signal(signal.SIGTERM)
    codes = wait_all(procs, timeout=60)
    # The trainer stops at its next step with a checkpoint (exit 128 + SIGTERM); the generator
    # is stopped cleanly by it.
    assert codes == [143, 0], read_logs(logs)[-3000:]
    assert "received SIGTERM" in (logs / "rank0.log").read_text()
    steps = read_summary(out)["steps"]
    assert (out / "checkpoints" / f"step_{steps:08d}" / "meta.json").is_file()
    words = {w: json.loads((out / "ranks" / f"rank{w}.json").read_text()) for w in (0, 1)}
    assert words[0]["status"] == "stopped" and words[1]["status"] == "finished"


def test_bad_caption_corpus_stops_every_rank_before_anything_is_built(tmp_path):
    logs = tmp_path / "logs"
    procs = start_ranks(2, ["--config", "cpu_demo", f"output_dir={tmp_path / 'run'}",
                            f"captions.path={tmp_path / 'missing.txt'}",
                            "transport.timeout_s=30"], logs)
    assert wait_all(procs, timeout=120) == [2, 2], read_logs(logs)[-3000:]
    for rank in (0, 1):
        text = (logs / f"rank{rank}.log").read_text()
        assert "input error: captions.path=" in text and "missing.txt" in text, text


def test_generator_failing_to_build_reaches_the_trainer_with_its_reason(tmp_path):
    logs = tmp_path / "logs"
    procs = start_ranks(2, job_args(tmp_path / "run", 1, "transport.timeout_s=30"), logs,
                        module="tests.fault_entry",
                        extra_env={"FAULT_BUILD_ERROR": "model folder vanished"})
    assert wait_all(procs, timeout=120) == [1, 1], read_logs(logs)[-3000:]
    trainer_log = (logs / "rank0.log").read_text()
    assert "generator rank 1 failed" in trainer_log and "model folder vanished" in trainer_log


def test_cpu_demo_preset_mixes_its_batches(tmp_path):
    """The shipped demo itself (toy diffusion generator, n=8, R=4, auto pool 32): batches share
    at most a third of their groups with the previous one and a group's uses spread out."""
    out = tmp_path / "demo"
    args = ["--config", "cpu_demo", f"output_dir={out}", "train.steps=60", "train.audit=true",
            "train.log_every=20", "train.image_grid_every=0", "eval.probe_at_end=false"]
    procs = start_ranks(2, args, tmp_path / "logs")
    assert wait_all(procs, timeout=400) == [0, 0], read_logs(tmp_path / "logs")[-4000:]
    audit = json.loads((out / "audit" / "trainer_rank0.json").read_text())
    assert audit["min_pool"] == 32
    overlap = batch_overlap(audit["batch_keys"])
    # Theory for a full pool: 8 / 32 x 3 / 4 ~ 0.19 repeated, uses over ~12 steps.
    assert 0.05 < overlap <= 1 / 3, overlap
    assert audit["use_spread_steps"] >= 8, audit["use_spread_steps"]
