"""Checkpoints written by the trainers themselves (DeepSpeed's save_checkpoint calls world-wide
barriers that generator ranks never join).

Layout: `<output_dir>/checkpoints/step_00001000/` holding `model.pt` (trainer rank 0),
`rank{r}.pt` (each trainer rank: optimizer shard, schedule, RNG, replay buffer, producer
cursors) and `meta.json`. Every rank writes into `step_….tmp/`; after a barrier over the trainer
group, rank 0 writes meta.json last, with a manifest of every file's size and SHA-256, and moves
the folder into place. A folder is a checkpoint only if its manifest verifies, so neither a
crash mid-write nor a later truncation hides the previous checkpoint: resume takes the newest
one that verifies and says which it skipped.
"""

from __future__ import annotations

import errno
import hashlib
import json
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from online_stablerep.atomic import atomic_path
from online_stablerep.distributed.env import get_rank, get_world_size
from online_stablerep.faults import injected

CHECKPOINT_DIR = "checkpoints"
# A checkpoint folder, or what a save leaves behind when killed: the folder being written
# (.tmp) or the previous copy of the same step being replaced (.old).
_NAME = re.compile(r"^step_(\d{8})(\.tmp|\.old)?$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the folder and what to do."""


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.iterdir()) if p.is_file() and p.name != "meta.json"
    }


def verify_checkpoint(folder: Path) -> str | None:
    """None when `folder` holds a complete checkpoint, else what is wrong with it."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except FileNotFoundError:
        return "no meta.json (the save did not finish)"
    except (OSError, ValueError) as err:
        return f"unreadable meta.json ({err})"
    files = meta.get("files")
    if not isinstance(files, dict) or "model.pt" not in files:
        return "meta.json has no manifest of its files"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{name} is {size} bytes, the manifest says {want['bytes']}"
        if _sha256(path) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def _candidates(root: Path) -> list[tuple[int, Path]]:
    """Checkpoint-like folders, newest first (at equal step: final, then .tmp, then .old)."""
    found = []
    for p in root.iterdir() if root.is_dir() else []:
        match = _NAME.match(p.name)
        if p.is_dir() and match:
            order = {None: 0, ".tmp": 1, ".old": 2}[match.group(2)]
            found.append((int(match.group(1)), -order, p))
    return [(step, p) for step, _, p in sorted(found, reverse=True)]


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def newest_checkpoint(
    output_dir: str | Path, warn: Callable[[str], None] = _warn
) -> Path | None:
    """The newest checkpoint folder whose manifest verifies, or None when there is none.

    A newer folder that does not verify is skipped with a warning (given to `warn`) naming it
    and why.

    Raises:
        CheckpointError: checkpoints exist but none verifies (names them and what to do).
    """
    root = checkpoint_root(output_dir)
    bad: list[str] = []
    for _, path in _candidates(root):
        problem = verify_checkpoint(path)
        if problem is None:
            if bad:
                warn(f"skipping newer checkpoints that do not verify ({'; '.join(bad)}): "
                     f"using {path}")
            return path
        if "did not finish" not in problem:
            bad.append(f"{path}: {problem}")
    if bad:
        raise CheckpointError(
            f"no checkpoint in {root} verifies ({'; '.join(bad)}): move the damaged folders "
            "away to start fresh with resume=true, or use a new output_dir"
        )
    return None


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
    with atomic_path(path, ".part") as tmp:
        torch.save(obj, tmp)


def _disk_full(err: BaseException) -> bool:
    # torch.save reports a short write as "[enforce fail at inline_container.cc] unexpected pos"
    # (or "file write failed"), never with the errno.
    return (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        isinstance(err, RuntimeError)
        and ("unexpected pos" in str(err) or "file write failed" in str(err))
    )


def _barrier(group: dist.ProcessGroup | None, timeout_s: float | None) -> None:
    if get_world_size(group) == 1:
        return
    if timeout_s and dist.get_backend(group) == "gloo":
        # Names the rank that did not arrive, with its own timeout.
        dist.monitored_barrier(group=group, timeout=timedelta(seconds=timeout_s))
    else:
        dist.barrier(group=group)


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model_state: dict[str, Any] | None,
    rank_state: dict[str, Any],
    group: dist.ProcessGroup | None,
    keep: int,
    meta: dict[str, Any] | None = None,
    timeout_s: float | None = None,
) -> Path:
    """Collective over the trainer `group`: every trainer rank calls it at the same step.

    Args:
        model_state: the model's state dict, given on trainer rank 0 only (others pass None).
        rank_state: this rank's own state (optimizer shard, RNG, buffer, cursors).
        keep: how many newest complete checkpoints to keep.
        timeout_s: how long a rank waits at the barriers for the others to finish writing
            (`transport.collective_timeout_s`; None: the group's own timeout).

    Raises:
        CheckpointError: the disk is full (the partial folder is removed first).
    """
    rank = get_rank(group)
    root = checkpoint_root(output_dir)
    final = _step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    written = False  # meta.json is in the folder: a complete checkpoint, even before its rename
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier(group, timeout_s)
        if rank == 0:
            assert model_state is not None
            _atomic_torch_save(model_state, tmp / "model.pt")
        _atomic_torch_save(rank_state, tmp / f"rank{rank}.pt")
        time.sleep(injected().checkpoint_delay_s)  # tests only: a slow disk
        _barrier(group, timeout_s)
        if rank == 0:
            # 1. The manifest goes last: a folder with meta.json is complete.
            info = {"step": step, "trainer_ranks": get_world_size(group), "time": time.time(),
                    **(meta or {}), "files": _manifest(tmp)}
            (tmp / "meta.json").write_text(json.dumps(info, indent=2))
            written = True
            # 2. A re-save of the same step moves the complete copy aside until the new one is
            # in place, so some complete copy exists at every moment.
            old = final.with_name(final.name + ".old")
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
            _prune(root, keep)
    except BaseException as err:
        # Whatever failed (a full disk, a peer missing at the barrier, a signal), the partial
        # folder goes: a save that did not write its manifest is no checkpoint.
        if (rank == 0 or _disk_full(err)) and not written:
            shutil.rmtree(tmp, ignore_errors=True)
        if not _disk_full(err):
            raise
        raise CheckpointError(
            f"cannot write checkpoint {tmp}: no space left on device (removed the partial "
            "folder; free space or lower train.keep_checkpoints, then resume=true)"
        ) from None
    _barrier(group, timeout_s)
    return final


def _prune(root: Path, keep: int) -> None:
    """Keep the `keep` newest complete checkpoints; remove older ones and the leftovers of
    killed saves (.tmp, .old) that are not newer than the newest complete one."""
    complete, leftovers = [], []
    for p in root.iterdir():
        match = _NAME.match(p.name)
        if not (p.is_dir() and match):
            continue
        if match.group(2) is None and (p / "meta.json").is_file():
            complete.append((int(match.group(1)), p))
        else:
            leftovers.append((int(match.group(1)), p))
    complete.sort()
    newest = complete[-1][0] if complete else -1
    for _, old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for step, old in leftovers:
        if step <= newest:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, rank: int, world: int) -> tuple[dict, dict, dict]:
    """(model state, this rank's state, meta) of a complete checkpoint folder.

    Raises:
        CheckpointError: written by a different number of trainer ranks, or unreadable.
    """
    meta = json.loads((path / "meta.json").read_text())
    if meta["trainer_ranks"] != world:
        raise CheckpointError(
            f"checkpoint {path} was written by {meta['trainer_ranks']} trainer ranks; this job "
            f"has {world}: resume with the same number of trainers"
        )
    try:
        model_state = torch.load(path / "model.pt", map_location="cpu", weights_only=False)
        rank_state = torch.load(path / f"rank{rank}.pt", map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as err:
        raise CheckpointError(
            f"cannot read checkpoint {path} ({str(err).splitlines()[0]}): move it away to "
            "resume from the one before"
        ) from None
    return model_state, rank_state, meta
