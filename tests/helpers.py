"""The helpers tests (and benchmarks) share: a free port, the CLI or the job's ranks in fresh
processes (DeepSpeed and torch.distributed keep process-wide state; tests that start ranks as a
launcher would know every rank's PID), small configs, and readers of what a run wrote."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

# A tiny colocated procedural run: seconds per step on 2 cores.
TINY_PROCEDURAL = [
    "model.backbone=resnet10t",
    "model.image_size=32",
    "model.head_hidden_dim=64",
    "model.embed_dim=32",
    "batch.captions_per_batch=8",
    "batch.views_per_caption=2",
    "producer.images_per_caption=3",
    "producer.output_size=32",
    "producer.captions_per_call=8",
    "procedural.num_categories=20",
    "procedural.render_size=32",
    "procedural.num_points=800",
    "replay.capacity=48",  # above the auto min_pool of 32, so topping up never evicts
    "train.log_every=1",
    "train.image_grid_every=2",
    "train.cpu_threads=1",
    "eval.probe_at_end=false",
    "optim.warmup_steps=2",
]


def run_cli(args: list[str], timeout: float = 300, env: dict | None = None):
    """Run `python -m online_stablerep.cli ARGS` in a new process; returns CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        full_env.pop(key, None)
    return subprocess.run(
        [sys.executable, "-m", "online_stablerep.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=full_env,
    )


def read_summary(output_dir: Path) -> dict:
    return json.loads((Path(output_dir) / "train_summary.json").read_text())


def tensorboard_tags(log_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    tags = acc.Tags()
    return set(tags["scalars"]) | set(tags["images"])


def batch_overlap(batches: list[list]) -> float:
    """Mean fraction of a batch's groups that were in the previous batch, from an audit's
    `batch_keys` ((caption id, epoch, producer rank) per group)."""
    batches = [[tuple(key) for key in batch] for batch in batches]
    pairs = list(zip(batches[:-1], batches[1:], strict=True))
    return sum(len(set(a) & set(b)) / len(b) for a, b in pairs) / len(pairs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ranks(world: int, args: list[str], log_dir: Path, module: str = "online_stablerep.cli",
                extra_env: dict | None = None) -> list[subprocess.Popen]:
    """`python -m MODULE train ARGS` on `world` ranks; logs in log_dir/rankN.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": "1", **(extra_env or {})}
        log = open(log_dir / f"rank{rank}.log", "w")  # noqa: SIM115 (closed with the process)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", module, "train", *args],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        ))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Exit codes of every rank; kills all and fails if any outlives `timeout`."""
    codes = []
    try:
        for proc in procs:
            codes.append(proc.wait(timeout=timeout))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        raise AssertionError(f"a rank did not exit within {timeout} s") from None
    return codes


def read_logs(log_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(log_dir.glob("rank*.log")))

# Test-only helpers that used to ship in the package (no job uses them).


def render_category_images(cfg, caption_id: int, image_indices):
    """(len(image_indices), 3, S, S) uint8 renders of one category (e.g. a held-out set)."""
    from online_stablerep.fractals import render_images

    return render_images(cfg, [caption_id] * len(image_indices), list(image_indices))


def save_random_unet(unet, path: str | Path, seed: int = 0,
                     time_cond_proj_dim: int | None = None) -> Path:
    """Save a random-weight UNet of `unet`'s architecture (an LCM-style distilled UNet when
    `time_cond_proj_dim` is set: guidance is then an input, not a second pass)."""
    import torch
    from diffusers import UNet2DConditionModel

    config = {**unet.config, "time_cond_proj_dim": time_cond_proj_dim}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UNet2DConditionModel.from_config(config)
    model.save_pretrained(str(path))
    return Path(path)
