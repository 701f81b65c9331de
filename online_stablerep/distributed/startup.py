"""Start-up across nodes. On one node the wrapper checks the input before any rank starts, so
bad input ends there. On several nodes started independently (no ssh: Slurm steps, Kubernetes
jobs) one node's check cannot stop the others, which would wait out the rendezvous timeout.
So on several nodes every rank joins the rendezvous even when its own check failed, and the
ranks share their verdicts in one all-gather before any other group exists: every rank on
every node then stops with the reason, naming the rank and node that failed."""

from __future__ import annotations

import torch
import torch.distributed as dist

from online_stablerep.config.validate import ConfigError

# Bytes of each rank's reason that travel (longer reasons are cut).
REASON_BYTES = 1024


class StartupError(ConfigError):
    """Some rank's start-up check failed (its input, its config); raised on every rank."""

    def __init__(self, message: str, own: bool) -> None:
        super().__init__(message)
        # True on the rank whose check failed, False on the ranks that heard of it.
        self.own = own


def several_nodes(world_size: int, local_world_size: int) -> bool:
    """Whether the job spans nodes (then start-up verdicts are shared)."""
    return world_size > local_world_size


def agree_on_startup(error: str | None, local_world_size: int) -> None:
    """Share this rank's start-up verdict (None: fine) with every rank of the default group.

    Raises:
        StartupError: naming the first rank (and its node) whose check failed, on every rank.
    """
    data = (error or "").encode()[:REASON_BYTES]
    mine = torch.zeros(REASON_BYTES + 1, dtype=torch.uint8)
    mine[0] = 1 if error is not None else 0
    mine[1 : 1 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    failed = [r for r, t in enumerate(everyone) if t[0]]
    if not failed:
        return
    first = failed[0]
    reason = bytes(everyone[first][1:].tolist()).rstrip(b"\0").decode("utf-8", "replace")
    others = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
    raise StartupError(
        f"start-up failed on rank {first} (node {first // local_world_size}){others}: {reason}",
        own=error is not None,
    )
