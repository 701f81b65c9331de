"""Checkpoints written by the trainers themselves (DeepSpeed's save_checkpoint calls world-wide
barriers that generator ranks never join).

Layout: `<output_dir>/checkpoints/step_00001000/` holding `model.pt` (trainer rank 0),
`rank{r}.pt` (each trainer rank: optimizer shard, schedule, RNG, replay buffer, producer
cursors) and `meta.json`. Every rank writes into `step_….tmp/`; after a barrier over the trainer
group, rank 0 writes meta.json and renames the folder. A folder without meta.json is incomplete
and ignored, so a crash mid-write never hides the previous checkpoint.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from online_stablerep.distributed.env import get_rank, get_world_size

CHECKPOINT_DIR = "checkpoints"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def newest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return None
    complete = [
        p for p in root.iterdir()
        if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp")
        and (p / "meta.json").is_file()
    ]
    return max(complete, key=lambda p: int(p.name[len("step_"):]), default=None)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".part")
    torch.save(obj, tmp)
    tmp.replace(path)


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model_state: dict[str, Any] | None,
    rank_state: dict[str, Any],
    group: dist.ProcessGroup | None,
    keep: int,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Collective over the trainer `group`: every trainer rank calls it at the same step.

    Args:
        model_state: the model's state dict, given on trainer rank 0 only (others pass None).
        rank_state: this rank's own state (optimizer shard, RNG, buffer, cursors).
        keep: how many newest complete checkpoints to keep.
    """
    rank, world = get_rank(group), get_world_size(group)
    root = checkpoint_root(output_dir)
    final = _step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if world > 1:
        dist.barrier(group=group)
    if rank == 0:
        assert model_state is not None
        _atomic_torch_save(model_state, tmp / "model.pt")
    _atomic_torch_save(rank_state, tmp / f"rank{rank}.pt")
    if world > 1:
        dist.barrier(group=group)
    if rank == 0:
        info = {"step": step, "trainer_ranks": world, "time": time.time(), **(meta or {})}
        (tmp / "meta.json").write_text(json.dumps(info, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _prune(root, keep)
    if world > 1:
        dist.barrier(group=group)
    return final


def _prune(root: Path, keep: int) -> None:
    complete = sorted(
        (p for p in root.iterdir() if p.is_dir() and (p / "meta.json").is_file()),
        key=lambda p: int(p.name[len("step_"):]),
    )
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, rank: int, world: int) -> tuple[dict, dict, dict]:
    """(model state, this rank's state, meta) of a complete checkpoint folder.

    Raises:
        ValueError: when the checkpoint was written by a different number of trainer ranks.
    """
    meta = json.loads((path / "meta.json").read_text())
    if meta["trainer_ranks"] != world:
        raise ValueError(
            f"checkpoint {path} was written by {meta['trainer_ranks']} trainer ranks; this job "
            f"has {world}: resume with the same number of trainers"
        )
    model_state = torch.load(path / "model.pt", map_location="cpu", weights_only=False)
    rank_state = torch.load(path / f"rank{rank}.pt", map_location="cpu", weights_only=False)
    return model_state, rank_state, meta
