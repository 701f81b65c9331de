"""`python -m online_stablerep.commands.ranks --config X [--world N] [k=v ...]`: validate a config
and its inputs for a launch of N ranks and print how many ranks a CPU launch needs (one trainer
plus the generators). Used by launch/train.sh, so bad input ends it with exit code 2 before any
rank starts."""

from __future__ import annotations

import argparse
import sys

from online_stablerep.commands.common import add_config_arguments, load_or_report
from online_stablerep.config.inputs import InputError, check_inputs
from online_stablerep.config.validate import parse_generators


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="online_stablerep.commands.ranks")
    add_config_arguments(parser)
    parser.add_argument("--world", type=int, default=0,
                        help="ranks the launch will start (0: one trainer plus the generators)")
    args = parser.parse_args(argv)
    cfg = load_or_report(args)
    if cfg is None:
        return 2
    count, _ = parse_generators(cfg.roles.generators)
    try:
        check_inputs(cfg, args.world or 1 + count)
    except InputError as err:
        print(f"input error: {err}", file=sys.stderr, flush=True)
        return 2
    print(1 + count)
    print(cfg.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
