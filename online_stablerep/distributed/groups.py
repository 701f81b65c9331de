"""Process groups of a job, created on ALL ranks in the same order (new_group is collective
over the world: a rank that skips one deadlocks the job)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from online_stablerep.distributed.env import comm_backend
from online_stablerep.distributed.roles import Roles


@dataclass
class JobGroups:
    """The groups one rank sees; groups it is not a member of are None."""

    roles: Roles
    rank: int
    # Trainer data-parallel group (nccl on GPU, gloo on CPU); None on generator ranks.
    trainer: dist.ProcessGroup | None
    # This trainer's size-1 model-parallel group (DeepSpeed's mpu asks for one).
    model_parallel: dist.ProcessGroup | None
    # World-wide gloo group carrying caption-group payloads (CPU tensors only).
    data_plane: dist.ProcessGroup | None
    # World-wide gloo group carrying credits and control messages, apart from payloads so the
    # two threads that use them never interleave on one group.
    control: dist.ProcessGroup | None
    # Trainer group on gloo for host-side flags (stream end, stop): agreeing on them must not
    # wait for the device's queued work, as an NCCL all-reduce read back with .item() would.
    # The trainer group itself on CPU jobs; None on generator ranks.
    trainer_host: dist.ProcessGroup | None = None


def init_distributed(device: torch.device, timeout_s: float) -> None:
    """Initialise torch.distributed from the launcher's environment, without device_id.

    DeepSpeed may pass device_id to init_process_group, which makes NCCL eager and can hang
    ranks outside later groups; initialising here first makes deepspeed.init_distributed
    reuse this default group.
    """
    if device.type == "cpu":
        _skip_deepspeed_shm_op()
    if dist.is_initialized():
        return
    backend = comm_backend(device)
    if backend == "nccl":
        # Generator-only ranks never touch NCCL; gloo on the world group keeps barriers on CPU.
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(
        backend=backend,
        timeout=timedelta(seconds=timeout_s),
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
    )


def init_with_deepspeed(device: torch.device, timeout_s: float) -> None:
    """`init_distributed`, then DeepSpeed's comm layer on top of the same default group."""
    import deepspeed

    init_distributed(device, timeout_s)
    deepspeed.init_distributed(dist_backend=comm_backend(device), auto_mpi_discovery=False)


def _skip_deepspeed_shm_op() -> None:
    """Keep DeepSpeed off its CPU shared-memory all-reduce op.

    DeepSpeed JIT-compiles that op whenever its comm backend starts on a CPU accelerator, and
    here the ranks of one launch rebuild it in turn (minutes on 2 cores, every launch). Our
    trainer collectives run on gloo anyway, which is what DeepSpeed falls back to without it.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def create_groups(roles: Roles, device: torch.device, timeout_s: float) -> JobGroups:
    """Create every group of the job; must be called on every rank in the same order."""
    rank = dist.get_rank()
    timeout = timedelta(seconds=timeout_s)
    trainer = dist.new_group(roles.trainer_ranks, backend=comm_backend(device), timeout=timeout)
    model_parallel = None
    for r in roles.trainer_ranks:
        group = dist.new_group([r], backend=comm_backend(device), timeout=timeout)
        if r == rank:
            model_parallel = group
    trainer_host = trainer
    if device.type != "cpu":
        trainer_host = dist.new_group(roles.trainer_ranks, backend="gloo", timeout=timeout)
    data_plane = control = None
    if not roles.colocated:
        everyone = list(range(roles.world_size))
        data_plane = dist.new_group(everyone, backend="gloo", timeout=timeout)
        control = dist.new_group(everyone, backend="gloo", timeout=timeout)
    is_trainer = roles.is_trainer(rank)
    return JobGroups(
        roles=roles,
        rank=rank,
        trainer=trainer if is_trainer else None,
        model_parallel=model_parallel,
        data_plane=data_plane,
        control=control,
        trainer_host=trainer_host if is_trainer else None,
    )


class TrainerMPU:
    """The mpu DeepSpeed needs so it never clones the world group (which would hang when only
    trainer ranks call deepspeed.initialize): data parallel = trainer group, model parallel =
    this rank alone."""

    def __init__(self, groups: JobGroups) -> None:
        assert groups.trainer is not None and groups.model_parallel is not None
        self._dp = groups.trainer
        self._mp = groups.model_parallel

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self._dp

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self._dp)

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self._dp)

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self._mp

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1
