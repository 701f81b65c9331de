"""`online-stablerep train-toy-generator`: train the toy text-to-image model of the procedural
world and save it as a diffusers folder (see docs/toy-model.md)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output diffusers folder")
    parser.add_argument("--steps", type=int, default=4000, help="UNet/text-encoder steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything")
    parser.add_argument("--batch-size", type=int, default=48, help="images per UNet step")
    parser.add_argument("--lr", type=float, default=1e-3, help="UNet/text-encoder learning rate")
    parser.add_argument("--vae-steps", type=int, default=400, help="autoencoder steps")
    parser.add_argument("--classifier-steps", type=int, default=300, help="classifier steps")
    parser.add_argument("--bank", type=int, default=1500, help="training renders per category")
    parser.add_argument("--eval-every", type=int, default=250,
                        help="score samples and save the folder every this many steps")
    parser.add_argument("--max-minutes", type=float, default=0.0,
                        help="stop and save after this much wall time (0: no limit)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")


def run(args: argparse.Namespace) -> int:
    for name in ("steps", "batch_size", "vae_steps", "bank", "eval_every"):
        if getattr(args, name) < 1:
            print(f"--{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    import torch

    from online_stablerep.toy.train import ToyTrainConfig, train_toy_generator

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = ToyTrainConfig(
        out=args.out, steps=args.steps, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
        vae_steps=args.vae_steps, classifier_steps=args.classifier_steps,
        bank_per_category=args.bank, eval_every=args.eval_every, max_minutes=args.max_minutes,
        command="online-stablerep train-toy-generator " + shlex.join(sys.argv[2:]),
    )
    record = train_toy_generator(cfg)
    print(f"saved {args.out}: {record['steps_done']} steps in {record['wall_s']:.0f}s, "
          f"sample accuracy {record['sample_accuracy'][-1][1]:.3f}")
    return 0
