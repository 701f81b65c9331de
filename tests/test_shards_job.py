"""The training job with shards: a colocated procedural run writes its groups to shards, a second run
trains from them (producer.kind=shards); stop/resume and a killed run neither duplicate nor
lose a group; bad shards and a full disk end the job with one line naming the file."""

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from online_stablerep.config import load_config
from online_stablerep.producers.procedural import ProceduralProducer
from online_stablerep.shards.format import decode_sample, iter_samples, sample_key, scan_keys
from tests.helpers import TINY_PROCEDURAL, read_summary, run_cli

pytestmark = pytest.mark.slow

BASE = ["train", "--config", "cpu_procedural", *TINY_PROCEDURAL, "train.checkpoint_every=0",
        "train.image_grid_every=0"]


def train(out: Path, *extra: str):
    result = run_cli([*BASE, f"output_dir={out}", *extra])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def keys(folder: Path) -> list[str]:
    return [k for p in sorted(folder.glob("*.tar")) for k in scan_keys(p)]


def stream_keys(count: int) -> list[str]:
    """The keys of the first `count` groups the run's producer makes, in order."""
    producer = ProceduralProducer(load_config("cpu_procedural", TINY_PROCEDURAL), 0, 1)
    groups = []
    while len(groups) < count:
        groups.extend(producer.next_groups())
    return [sample_key(g.epoch, g.caption_id) for g in groups[:count]]


def test_write_shards_then_train_from_them(tmp_path):
    shards = tmp_path / "shards"
    train(tmp_path / "write", "train.steps=4", f"shards.write_dir={shards}",
          "shards.groups_per_shard=16")
    assert not list(shards.glob("*.tmp"))
    written = keys(shards)
    assert written == stream_keys(len(written)) and len(written) >= 32
    # What is stored equals what the producer makes directly.
    cfg = load_config("cpu_procedural", TINY_PROCEDURAL)
    direct = ProceduralProducer(cfg, 0, 1).next_groups()
    stored = list(iter_samples(sorted(shards.glob("*.tar"))[0]))[: len(direct)]
    for group, (key, fields) in zip(direct, stored, strict=True):
        meta, images = decode_sample(Path("x"), key, fields, 32, False, 2)
        assert meta["caption_id"] == group.caption_id and meta["epoch"] == group.epoch
        assert torch.equal(images, group.images_kchw)
    # Offline: one epoch over the stored groups, then the stream ends.
    out = tmp_path / "offline"
    train(out, "producer.kind=shards", f"shards.path={shards}", "train.steps=200",
          "train.epochs=1", "train.audit=true")
    summary = read_summary(out)
    assert summary["stopped_because"] == "stream ended" and 4 <= summary["steps"] < 200
    audit = json.loads((out / "audit" / "trainer_rank0.json").read_text())
    seen = {c for batch in audit["batches"] for c in batch}
    assert seen <= {int(k.split("-c")[1]) for k in written}


def test_stop_and_resume_write_every_group_once(tmp_path):
    shards, out = tmp_path / "shards", tmp_path / "run"
    common = ["train.steps=8", f"shards.write_dir={shards}", "shards.groups_per_shard=16"]
    train(out, *common, "train.stop_after=4")
    first = keys(shards)
    train(out, *common, "resume=true")
    written = keys(shards)
    assert len(written) > len(first)
    assert written == stream_keys(len(written))  # no duplicate, no gap


def test_killed_run_resumes_without_duplicates_or_gaps(tmp_path):
    shards, out = tmp_path / "shards", tmp_path / "run"
    common = [f"output_dir={out}", f"shards.write_dir={shards}", "shards.groups_per_shard=1000",
              "train.checkpoint_every=2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.Popen([sys.executable, "-m", "online_stablerep.cli", *BASE, *common,
                             "train.steps=1000"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "step_00000004").is_dir() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(shards.glob("*.tar.tmp")) and not list(shards.glob("*.tar"))  # mid-shard
    train(out, *common, "train.steps=8", "resume=true")
    written = keys(shards)
    assert not list(shards.glob("*.tmp"))
    assert written == stream_keys(len(written))


def test_bad_shard_path_exits_2_with_one_line(tmp_path):
    result = run_cli([*BASE, f"output_dir={tmp_path / 'run'}", "producer.kind=shards",
                      f"shards.path={tmp_path / 'none'}/*.tar"])
    assert result.returncode == 2
    assert "no .tar files" in result.stderr and "Traceback" not in result.stderr


def _small_file_limit() -> None:
    # Writes past 400 kB fail with EFBIG instead of killing the process (SIGXFSZ ignored).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))


def test_full_disk_stops_the_job_naming_the_shard(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    result = subprocess.run(
        [sys.executable, "-m", "online_stablerep.cli", *BASE, f"output_dir={tmp_path / 'run'}",
         f"shards.write_dir={tmp_path / 'shards'}", "train.steps=1000",
         "shards.groups_per_shard=100000"],
        env=env, capture_output=True, text=True, timeout=300, preexec_fn=_small_file_limit)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "cannot write shard" in result.stderr and "rank00000-000000.tar.tmp" in result.stderr
    assert "Traceback" not in result.stderr


def test_hybrid_generator_rank_writes_shards_and_resumes_without_duplicates(tmp_path):
    from tests.helpers import start_ranks, wait_all

    shards, out = tmp_path / "shards", tmp_path / "run"
    args = ["--config", "cpu_procedural", f"output_dir={out}", *TINY_PROCEDURAL,
            "roles.generators=1", "train.checkpoint_every=0", "producer.captions_per_call=4",
            f"shards.write_dir={shards}", "shards.groups_per_shard=16", "train.steps=8"]
    assert wait_all(start_ranks(2, [*args, "train.stop_after=4"], tmp_path / "a"), 300) == [0, 0]
    first = keys(shards)
    assert wait_all(start_ranks(2, [*args, "resume=true"], tmp_path / "b"), 300) == [0, 0]
    written = keys(shards)
    assert len(written) > len(first)
    assert all(p.name.startswith("rank00001-") for p in shards.iterdir())  # the generator's
    assert written == stream_keys(len(written))


def test_offline_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    shards = tmp_path / "shards"
    train(tmp_path / "write", "train.steps=4", f"shards.write_dir={shards}",
          "shards.groups_per_shard=8")
    common = ["producer.kind=shards", f"shards.path={shards}", "train.steps=6"]
    train(tmp_path / "full", *common)
    train(tmp_path / "part", *common, "train.stop_after=3")
    train(tmp_path / "part", *common, "resume=true")
    assert read_summary(tmp_path / "part")["losses"] == read_summary(tmp_path / "full")["losses"]
