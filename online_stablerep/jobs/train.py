"""The training job: one process per rank, started by the deepspeed launcher (or alone).

Every rank validates its input, joins torch.distributed, creates all process groups in the same
order, then takes its role: trainer ranks run the Trainer, generator ranks feed them.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from online_stablerep.config import Config, ConfigError, save_config
from online_stablerep.config.schedule import Schedule, reuse_line
from online_stablerep.distributed.env import local_world_size
from online_stablerep.distributed.groups import JobGroups, create_groups, init_with_deepspeed
from online_stablerep.distributed.process import prepare_process
from online_stablerep.distributed.roles import Roles
from online_stablerep.distributed.startup import StartupError, agree_on_startup, several_nodes
from online_stablerep.jobs.preflight import InputError, check_inputs, job_schedule
from online_stablerep.jobs.shutdown import StopRequest, write_last_word
from online_stablerep.jobs.trainer_rank import run_trainer
from online_stablerep.monitoring.metrics import console
from online_stablerep.producers import build_producer
from online_stablerep.transport.messages import TransportError, describe_failure


def _run_generator(
    cfg: Config, roles: Roles, groups: JobGroups, device: torch.device, stop: StopRequest
) -> int:
    from online_stablerep.jobs.generator import run_generator

    rank = groups.rank
    shard, shards = roles.producer_shard(rank)
    return run_generator(cfg, groups, lambda: build_producer(cfg, shard, shards, rank, device),
                         stop)


def _role_name(cfg: Config, rank: int, world: int, local: int) -> str:
    """"trainer" or "generator" for last words and console lines ("unknown": a bad layout)."""
    try:
        roles = Roles.from_spec(cfg.roles.generators, world, local)
    except ConfigError:
        return "unknown"
    return "trainer" if roles.is_trainer(rank) else "generator"


def _failure(err: BaseException) -> tuple[str, str, bool]:
    """(reason, cause, traceback wanted): errors about input, the disk or a peer are reported in
    one line; a traceback is for bugs."""
    from online_stablerep.shards.format import ShardError
    from online_stablerep.shards.writer import ShardWriteError
    from online_stablerep.training.checkpoint import CheckpointError
    from online_stablerep.training.real_images import RealImageError
    from online_stablerep.training.trainer import NonFiniteLossError

    text = f"{err}" if isinstance(err, (SystemExit, KeyboardInterrupt)) else (
        f"{type(err).__name__}: {err}")
    if isinstance(err, TransportError):
        return str(err), "peer", False
    if isinstance(err, StartupError):
        return str(err), "own" if err.own else "peer", False
    described = describe_failure(err)
    if described.startswith(("connection closed", "stopped answering")):
        return f"{type(err).__name__}: {described}", "peer", False
    clean = (ConfigError, CheckpointError, NonFiniteLossError, ShardError, ShardWriteError,
             RealImageError, SystemExit, KeyboardInterrupt)
    return text, "own", not isinstance(err, clean)


def run_job(cfg: Config) -> int:
    """Run this rank's part of the job; returns the process exit code.

    Past the input check, every way out leaves a last word in `output_dir/ranks/rank{N}.json`
    (jobs/shutdown.py), and SIGTERM/SIGINT ask the rank to stop at its next step.

    Raises:
        InputError: bad input, before any process group or model exists (the CLI exits 2).
            On several nodes bad input instead fails every rank after the rendezvous, each
            with a last word naming the rank that failed (exit code 2).
    """
    device = prepare_process(cfg.train.cpu_threads)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = local_world_size(world)
    # 1. Everything that can fail on bad input fails here, before any group or model exists
    # (InputError: the CLI prints one line and exits 2). On several nodes the failure is held
    # until the rendezvous, so every node hears of it (distributed/startup.py).
    roles: Roles | None = None
    schedule: Schedule | None = None
    failure: str | None = None
    try:
        roles = check_inputs(cfg, world, local)
        # The schedule in steps, from the corpus and the trainer ranks (an explicit
        # train.steps wins): what the trainers run and config.yaml records.
        schedule = job_schedule(cfg, roles)
        cfg = schedule.apply(cfg)
    except InputError as err:
        if not several_nodes(world, local):
            raise
        failure = f"input error: {err}"
    role = _role_name(cfg, rank, world, local)
    if role == "generator" and cfg.roles.on_generator_loss == "continue":
        from online_stablerep.jobs.supervise import is_worker, supervise

        if not is_worker():
            return supervise(cfg.output_dir, rank)  # this rank may then fail alone
    stop = StopRequest()
    stop.install(lambda name: console(
        f"received {name}: stopping at the next step (trainers save a checkpoint first)",
        role="train" if role == "trainer" else "generator", rank=rank))
    write_last_word(cfg.output_dir, rank, role, "running")
    try:
        # 2. torch.distributed first (no device_id), then DeepSpeed reuses it. Ranks start at
        # different speeds (imports on a loaded node): the rendezvous has the start-up budget.
        init_with_deepspeed(device, cfg.transport.startup_timeout_s)
        if several_nodes(world, local):
            agree_on_startup(failure, local)
        assert roles is not None
        groups = create_groups(roles, device, cfg.transport.timeout_s)
        if rank == 0:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            save_config(cfg, Path(cfg.output_dir) / "config.yaml")
            console(roles.describe(), rank=rank)
            assert schedule is not None
            console(schedule.describe(), rank=rank)
            console(reuse_line(cfg, schedule), rank=rank)
        if roles.is_trainer(rank):
            code = run_trainer(cfg, roles, groups, device, stop)
        else:
            code = _run_generator(cfg, roles, groups, device, stop)
        if stop.is_set():
            write_last_word(cfg.output_dir, rank, role, "stopped",
                            f"{stop.signal_name} received by rank {rank} ({role})",
                            code=stop.exit_code)
            return stop.exit_code
        write_last_word(cfg.output_dir, rank, role, "finished", code=code)
        return code
    except BaseException as err:
        reason, cause, want_traceback = _failure(err)
        code = 2 if isinstance(err, StartupError) else 1
        print(f"[{role} rank {rank}] failed: {reason}", file=sys.stderr, flush=True)
        if want_traceback:
            traceback.print_exc()
        write_last_word(cfg.output_dir, rank, role, "failed", reason, cause, code=code)
        return code
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
