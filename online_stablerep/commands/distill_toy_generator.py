"""`online-stablerep distill-toy-generator`: distil the toy model into a few-step LCM-LoRA
student and save it as a diffusers LoRA folder (see docs/toy-model.md)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output adapter folder")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="toy-model diffusers folder (default: the shipped toy model)")
    parser.add_argument("--steps", type=int, default=3000, help="distillation steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything")
    parser.add_argument("--batch-size", type=int, default=16, help="latents per step")
    parser.add_argument("--lr", type=float, default=2e-4, help="LoRA learning rate")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--bank", type=int, default=800, help="training renders per category")
    parser.add_argument("--eval-every", type=int, default=100,
                        help="score samples and save the adapter every this many steps")
    parser.add_argument("--max-minutes", type=float, default=0.0,
                        help="stop and save after this much wall time (0: no limit)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")


def run(args: argparse.Namespace) -> int:
    for name in ("steps", "batch_size", "rank", "bank", "eval_every"):
        if getattr(args, name) < 1:
            print(f"--{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.teacher is not None and not (args.teacher / "model_index.json").is_file():
        print(f"--teacher {args.teacher}: not a diffusers folder (no model_index.json)",
              file=sys.stderr)
        return 2
    import torch

    from online_stablerep.toy.distill import DistillConfig, distill_toy_generator

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    extra = {"teacher": args.teacher} if args.teacher is not None else {}
    cfg = DistillConfig(
        out=args.out, steps=args.steps, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
        rank=args.rank, bank_per_category=args.bank, eval_every=args.eval_every,
        max_minutes=args.max_minutes,
        command="online-stablerep distill-toy-generator " + shlex.join(sys.argv[2:]), **extra,
    )
    record = distill_toy_generator(cfg)
    print(f"saved {args.out}: {record['steps_done']} steps in {record['wall_s']:.0f}s, "
          f"sample accuracy {record['sample_accuracy'][-1][1]}")
    return 0
