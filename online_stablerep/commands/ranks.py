"""`python -m online_stablerep.commands.ranks --config X [k=v ...]`: validate a config and print
how many ranks a CPU launch needs (one trainer plus the generators). Used by launch/train.sh."""

from __future__ import annotations

import argparse
import sys

from online_stablerep.commands.common import add_config_arguments, load_or_report
from online_stablerep.config.validate import parse_generators


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="online_stablerep.commands.ranks")
    add_config_arguments(parser)
    cfg = load_or_report(parser.parse_args(argv))
    if cfg is None:
        return 2
    count, _ = parse_generators(cfg.roles.generators)
    print(1 + count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
