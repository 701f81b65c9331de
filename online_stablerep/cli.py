"""`online-stablerep` console script: one subcommand per job, each in online_stablerep.commands."""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "train": "Train (one rank of a deepspeed launch, or a single process).",
    "generate": "Generate a preview grid of caption groups.",
    "probe": "Linear probe and k-NN of a trained encoder.",
    "export": "Write the trained backbone as timm loads it (safetensors + config.json).",
    "plan": "Recommend the split of generator and trainer GPUs.",
    "train-toy-generator": "Train the toy text-to-image model of the procedural world.",
    "config": "Print the resolved config as YAML (config show [--config P] [key=value ...]).",
    "distill-toy-generator": "Distil the toy model into a few-step LCM-LoRA student.",
}


def _module(command: str) -> str:
    return command.replace("-", "_")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand is listed; the options of `only` (all when None) are added. Adding a
    command's options imports its module, and some pull in diffusers and torch._dynamo (seconds
    per process): a rank that trains must not pay for `plan`'s imports."""
    parser = argparse.ArgumentParser(
        prog="online-stablerep",
        description="StableRep trained on Stable Diffusion images generated inside the job.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in SUBCOMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            module = importlib.import_module(f"online_stablerep.commands.{_module(name)}")
            module.add_arguments(command)
    return parser


def _requested(argv: list[str]) -> str | None:
    """The subcommand argv names (its first word that is not an option), if it is one."""
    first = next((arg for arg in argv if not arg.startswith("-")), None)
    return first if first in SUBCOMMANDS else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_requested(argv)).parse_args(argv)
    module = importlib.import_module(f"online_stablerep.commands.{_module(args.command)}")
    return int(module.run(args))


if __name__ == "__main__":
    sys.exit(main())
