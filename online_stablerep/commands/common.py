"""Arguments and config loading shared by the subcommands."""

from __future__ import annotations

import argparse
import sys

from online_stablerep.config import Config, ConfigError, load_config, preset_names

# The preset of `train` and `config show` when --config is not given.
DEFAULT_PRESET = "cpu_demo"


def add_config_arguments(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--config", default=default,
                        help=f"preset name ({', '.join(preset_names())}) or YAML path"
                             + (f"; default {default}" if default else ""))
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides with dotted keys, e.g. train.steps=100")
    parser.epilog = ("Every config key with its default, meaning and the presets' values: "
                     "docs/config.md. `online-stablerep config show [--config P] [key=value ...]` "
                     "prints the resolved config.")


def load_or_report(args: argparse.Namespace) -> Config | None:
    """The validated config, or None after printing the ConfigError (callers exit 2)."""
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return None
