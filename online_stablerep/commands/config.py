"""`online-stablerep config show`: the resolved config (preset or YAML, then overrides) as YAML."""

from __future__ import annotations

import argparse

from online_stablerep.commands.common import DEFAULT_PRESET, add_config_arguments, load_or_report
from online_stablerep.config import to_yaml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", help="print the config a run with these arguments uses",
                              description="Print the resolved config as YAML.")
    add_config_arguments(show, default=DEFAULT_PRESET)


def run(args: argparse.Namespace) -> int:
    cfg = load_or_report(args)
    if cfg is None:
        return 2
    print(to_yaml(cfg), end="")
    return 0
