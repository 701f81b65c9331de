"""`python -m online_stablerep.commands.ranks --config X [--world N] [--nodes M] [k=v ...]`:
validate a config and its inputs for a launch of N ranks on M nodes and print how many ranks
each node starts (N / M; without --world, a CPU launch's default: one trainer plus the
generators of the config, per node), then output_dir. Used by launch/train.sh, so bad input
ends it with exit code 2 before any rank starts (on several nodes the wrapper starts its ranks
anyway, so the other nodes hear the reason: distributed/startup.py)."""

from __future__ import annotations

import argparse
import sys

from online_stablerep.commands.common import add_config_arguments, load_or_report
from online_stablerep.config.validate import parse_generators
from online_stablerep.jobs.preflight import InputError, check_inputs, job_schedule


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="online_stablerep.commands.ranks")
    add_config_arguments(parser)
    parser.add_argument("--world", type=int, default=0,
                        help="ranks the launch will start on all nodes (0: one trainer plus the "
                             "generators, per node)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes of the launch")
    args = parser.parse_args(argv)
    cfg = load_or_report(args)
    if cfg is None:
        return 2
    count, _ = parse_generators(cfg.roles.generators)
    world = args.world or args.nodes * (1 + count)
    per_node = world // args.nodes
    code = 0
    try:
        job_schedule(cfg, check_inputs(cfg, world, per_node))
    except InputError as err:
        print(f"input error: {err}", file=sys.stderr, flush=True)
        code = 2
    print(per_node)
    print(cfg.output_dir)
    return code


if __name__ == "__main__":
    sys.exit(main())
