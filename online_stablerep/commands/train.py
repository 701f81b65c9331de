"""`online-stablerep train`: this rank's part of a training job."""

from __future__ import annotations

import argparse
import os
import sys

from online_stablerep.commands.common import DEFAULT_PRESET, add_config_arguments
from online_stablerep.config import ConfigError, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, default=DEFAULT_PRESET)
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment is used.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr, flush=True)
        return _tell_other_nodes(f"config error: {err}")
    from online_stablerep.jobs.preflight import InputError
    from online_stablerep.jobs.train import run_job

    try:
        return run_job(cfg)
    except InputError as err:
        print(f"input error: {err}", file=sys.stderr, flush=True)
        return 2


def _tell_other_nodes(reason: str) -> int:
    """On several nodes, join the rendezvous only to fail every rank with `reason` (with the
    default start-up budget: the config that would set it did not load); returns 2."""
    import torch.distributed as dist

    from online_stablerep.config.schema import TransportConfig
    from online_stablerep.distributed.env import default_device, local_world_size
    from online_stablerep.distributed.groups import init_distributed
    from online_stablerep.distributed.startup import StartupError, agree_on_startup, several_nodes

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = local_world_size(world)
    if "RANK" not in os.environ or not several_nodes(world, local):
        return 2
    init_distributed(default_device(), TransportConfig.startup_timeout_s)
    try:
        agree_on_startup(reason, local)
    except StartupError as err:
        print(f"[rank {os.environ['RANK']}] failed: {err}", file=sys.stderr, flush=True)
    finally:
        dist.destroy_process_group()
    return 2
