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
}


def _module(command: str) -> str:
    return command.replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="online-stablerep",
        description="StableRep trained on Stable Diffusion images generated inside the job.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in SUBCOMMANDS.items():
        module = importlib.import_module(f"online_stablerep.commands.{_module(name)}")
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(f"online_stablerep.commands.{_module(args.command)}")
    return int(module.run(args))


if __name__ == "__main__":
    sys.exit(main())
