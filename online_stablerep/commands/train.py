"""`online-stablerep train`: this rank's part of a training job."""

from __future__ import annotations

import argparse
import sys

from online_stablerep.commands.common import add_config_arguments, load_or_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, default="cpu_demo")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment is used.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    cfg = load_or_report(args)
    if cfg is None:
        return 2
    from online_stablerep.config.inputs import InputError
    from online_stablerep.jobs.train import run_job

    try:
        return run_job(cfg)
    except InputError as err:
        print(f"input error: {err}", file=sys.stderr, flush=True)
        return 2
