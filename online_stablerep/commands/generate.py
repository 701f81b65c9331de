"""`online-stablerep generate`: a preview grid of caption groups, and the producer's images/s."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from online_stablerep.commands.common import add_config_arguments, load_or_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, default="cpu_demo")
    parser.add_argument("--captions", default="",
                        help="caption file or directory (default: captions.path of the config)")
    parser.add_argument("--num", type=int, default=8, help="captions to draw (rows of the grid)")
    parser.add_argument("--out", type=Path, default=Path("grid.png"), help="PNG to write")


def run(args: argparse.Namespace) -> int:
    if args.num < 1:
        print(f"--num must be >= 1, got {args.num}", file=sys.stderr)
        return 2
    # A preview shows the corpus's first captions, in order; explicit overrides still win.
    args.overrides = ["captions.shuffle=false"] + (
        [f"captions.path={args.captions}"] if args.captions else []) + list(args.overrides)
    cfg = load_or_report(args)
    if cfg is None:
        return 2
    from online_stablerep.monitoring.preview import render_grid
    from online_stablerep.producers.diffusion import DiffusionProducer

    try:
        producer = DiffusionProducer(cfg, shard=0, num_shards=1)
    except ValueError as err:
        print(f"captions: {err}", file=sys.stderr)
        return 2
    groups = []
    try:
        producer.start()
        t0 = time.perf_counter()
        while len(groups) < args.num:
            batch = producer.next_groups()
            if not batch:
                break
            groups.extend(batch)
        seconds = time.perf_counter() - t0
    finally:
        producer.close()
    groups = groups[: args.num]
    images = sum(g.num_images for g in groups)
    g = cfg.generator
    title = (f"{g.model} · {g.scheduler} {g.steps} steps · guidance {g.guidance} · "
             f"{cfg.producer.images_per_caption} images per caption")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    render_grid(groups, title=title).save(args.out)
    print(f"{images} images from {len(groups)} captions in {seconds:.1f}s: "
          f"{images / seconds:.2f} images/s on {producer.device} -> {args.out}")
    return 0
