"""`online-stablerep probe`: linear probe and k-NN of a checkpoint's encoder."""

from __future__ import annotations

import argparse
from pathlib import Path

from online_stablerep.commands.common import add_config_arguments, load_or_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, default="cpu_procedural")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="checkpoint folder (default: newest in output_dir)")
    parser.add_argument("--suite", default=None,
                        help="named transfer suite to probe on instead of eval.dataset "
                             "(same as eval.suite=NAME; docs/evaluation.md), e.g. procedural100")


def run(args: argparse.Namespace) -> int:
    if args.suite is not None:
        args.overrides = [*args.overrides, f"eval.suite={args.suite}"]
    cfg = load_or_report(args)
    if cfg is None:
        return 2
    from online_stablerep.distributed.env import default_device
    from online_stablerep.eval.run import probe_checkpoint

    try:
        probe_checkpoint(cfg, args.checkpoint, default_device())
    except ValueError as err:
        print(f"probe: {err}")
        return 2
    return 0
