"""`online-stablerep export`: the trained backbone as timm loads it (safetensors + config.json)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from online_stablerep.config import ConfigError, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="checkpoint folder (output_dir/checkpoints/step_N)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write")
    parser.add_argument("--config", default=None,
                        help="the run's config (default: config.yaml beside the checkpoints)")
    parser.add_argument("--head", action="store_true",
                        help="also write the projection head (head.safetensors, head.json)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides with dotted keys")


def run(args: argparse.Namespace) -> int:
    from online_stablerep.eval.export import export_encoder, run_config_of

    config = args.config or run_config_of(args.checkpoint)
    if args.config is None and not Path(config).is_file():
        print(f"export: no {config} beside the checkpoint; pass --config (the run's config)",
              file=sys.stderr)
        return 2
    try:
        cfg = load_config(str(config), args.overrides)
        written = export_encoder(cfg, args.checkpoint, args.out, head=args.head)
    except (ConfigError, ValueError) as err:
        print(f"export: {err}", file=sys.stderr)
        return 2
    print(f"exported {cfg.model.backbone} to {args.out}: "
          + ", ".join(p.name for p in written))
    print(f'load it with: timm.create_model("local-dir:{args.out}", pretrained=True)')
    return 0
