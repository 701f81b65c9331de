"""Distributed helpers: safe rank accessors, the role layout, process groups."""

from online_stablerep.distributed.env import (
    comm_backend,
    default_device,
    get_rank,
    get_world_size,
    is_initialized,
)

__all__ = ["comm_backend", "default_device", "get_rank", "get_world_size", "is_initialized"]
