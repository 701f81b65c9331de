"""Safe accessors for torch.distributed: rank 0 of a world of 1 when nothing is initialised,
so losses, models and producers run unchanged in a single process and in tests."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank(group: dist.ProcessGroup | None = None) -> int:
    """Rank within `group` (the world if None); 0 when not distributed."""
    return dist.get_rank(group) if is_initialized() else 0


def get_world_size(group: dist.ProcessGroup | None = None) -> int:
    """Size of `group` (the world if None); 1 when not distributed."""
    return dist.get_world_size(group) if is_initialized() else 1


def local_rank() -> int:
    """LOCAL_RANK set by the deepspeed/torchrun launcher, else 0."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size(default: int = 1) -> int:
    """Ranks on this node: LOCAL_WORLD_SIZE (torchrun) or LOCAL_SIZE (the deepspeed launcher,
    which does not set LOCAL_WORLD_SIZE), else `default`."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(name):
            return int(os.environ[name])
    return default


def default_device() -> torch.device:
    """This process's CUDA device when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def comm_backend(device: torch.device) -> str:
    """Collective backend for tensors on `device`: nccl for CUDA, gloo for CPU."""
    return "nccl" if device.type == "cuda" else "gloo"
