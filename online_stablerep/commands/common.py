"""Arguments and config loading shared by the subcommands."""

from __future__ import annotations

import argparse
import sys

from online_stablerep.config import Config, ConfigError, load_config


def add_config_arguments(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--config", default=default,
                        help="preset name or YAML path (see README: Config reference)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides with dotted keys, e.g. train.steps=100")


def load_or_report(args: argparse.Namespace) -> Config | None:
    """The validated config, or None after printing the ConfigError (callers exit 2)."""
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return None
