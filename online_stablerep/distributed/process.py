"""The process a rank runs in, set up before any process group exists: the launcher's variables
for a world of one, this rank's device, its CPU cores and threads, and the open-files limit that
gloo's sockets need."""

from __future__ import annotations

import os
import socket

import torch

from online_stablerep.distributed.env import default_device, local_world_size
from online_stablerep.monitoring.metrics import console

# Sockets a rank holds per peer: one gloo pair for each of the world-wide gloo groups (default,
# data plane, control) and the trainer group on CPU (benchmarks/scale_model.py measured 3.95).
SOCKETS_PER_PEER = 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def single_process_env() -> None:
    """Let `online-stablerep train` run without a launcher as a world of one rank."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if "LOCAL_SIZE" not in os.environ:  # the deepspeed launcher's ranks-per-node
        os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _pin_cpu_cores() -> None:
    """On CPU launches, give each local rank its own share of the cores so ranks do not fight
    over them (launch/train.sh sets ONLINE_STABLEREP_PIN_CORES=1)."""
    local_world = local_world_size()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cores = sorted(os.sched_getaffinity(0))
    share = max(1, len(cores) // local_world)
    mine = cores[(local * share) % len(cores):][:share]
    os.sched_setaffinity(0, mine)
    torch.set_num_threads(len(mine))


def _raise_open_files_limit(world: int, rank: int) -> None:
    """Gloo connects every pair of ranks of a group: at 1,000 ranks a rank holds about 4,000
    sockets, past the usual soft limit of 1,024 open files. Raise the soft limit to the hard
    one when the job needs more, and say so when even that is too low."""
    import resource

    need = SOCKETS_PER_PEER * world + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    top = need if hard == resource.RLIM_INFINITY else min(hard, need)
    resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))
    if top < need and rank == 0:
        console(f"warning: a job of {world} ranks needs about {need} open files per rank "
                f"(gloo's sockets) but the hard limit is {hard}: raise it (ulimit -n) or "
                "group creation fails with 'Too many open files'", rank=rank)


def prepare_process(cpu_threads: int) -> torch.device:
    """Set this rank's process up (`train.cpu_threads` as `cpu_threads`, 0 = torch's default)
    and return its device."""
    single_process_env()
    device = default_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if device.type == "cpu" and os.environ.get("ONLINE_STABLEREP_PIN_CORES") == "1":
        _pin_cpu_cores()
    if cpu_threads:
        torch.set_num_threads(cpu_threads)
    _raise_open_files_limit(int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]))
    return device
