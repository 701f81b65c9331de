"""Real images on the trainer's critical path: a training step fed by `mix.*` real images decoded
on the trainer's thread (`mix.prefetch_batches=0`) against decoded ahead on a thread (2).

Each step takes r real images from an ImageFolder of JPEGs (photo-sized, 500 x 375, made here:
smooth shapes, no download), resized to the producer's output size, then runs a forward, the
multi-positive loss and an AdamW step of the project's model (build_model) on the step's rows.
The two modes run in alternating blocks of steps (a block's first steps are not timed, so the
prefetcher starts each block cold), medians over the blocks' steps. The figure is the step rate
and the trainer's wait for real images per step.

    python benchmarks/real_mix.py                    # CPU, one torch thread for the model
    python benchmarks/real_mix.py --device cuda --backbone vit_base_patch16_224 \
        --input-size 224 --rows 258                  # a ViT-B/16 step at the paper's batch
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from PIL import Image, ImageDraw

from benchmarks.common import (
    Timing,
    add_common_arguments,
    machine_name,
    resolve_device,
    write_results,
)

MODES = {"trainer_thread": 0, "prefetch": 2}


def make_photos(root: Path, classes: int, per_class: int, size: tuple[int, int]) -> None:
    """JPEGs with smooth shapes: they decode at a photo's cost (noise would cost more)."""
    rng = random.Random(0)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
            draw = ImageDraw.Draw(img)
            for _ in range(12):
                x, y = rng.randrange(size[0]), rng.randrange(size[1])
                r = rng.randrange(20, 160)
                draw.ellipse((x - r, y - r, x + r, y + r),
                             fill=tuple(rng.randrange(256) for _ in range(3)))
            img.save(folder / f"{i}.jpg", quality=90)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, warmup=3, reps=20)
    parser.add_argument("--real", type=int, default=11, help="real images per step (r)")
    parser.add_argument("--output-size", type=int, default=224,
                        help="size the real images are resized to (producer.output_size)")
    parser.add_argument("--rows", type=int, default=32, help="rows of the model's step")
    parser.add_argument("--input-size", type=int, default=32, help="model input size")
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--blocks", type=int, default=3, help="alternating blocks per mode")
    return parser.parse_args(argv)


def build_step(args: argparse.Namespace, device: torch.device):
    from online_stablerep.config import load_config
    from online_stablerep.losses.multi_positive import multi_positive_contrastive_loss
    from online_stablerep.models.encoder import build_model

    cfg = load_config("cpu_procedural", [f"model.backbone={args.backbone}",
                                         f"model.image_size={args.input_size}"])
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    k = 2
    ids = torch.arange(args.rows // k, device=device).repeat(k)
    rows = torch.rand(args.rows, 3, args.input_size, args.input_size, device=device)

    def step(real: list[Any]) -> None:
        # The real images enter the batch as the job's MixedSource puts them (uint8 stacked).
        real_rows = torch.stack([item.image for item in real]).to(device)
        small = torch.nn.functional.interpolate(real_rows.float() / 255, size=args.input_size)
        batch = torch.cat([small, rows[len(real):]])
        # bf16 autocast on a GPU, as the trainer runs there.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            embed = model(batch, k)["image_embed"]
        loss = multi_positive_contrastive_loss(embed.float(), ids, 0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def run_block(real_source, step, r: int, warmup: int, reps: int) -> tuple[list[float], float]:
    seconds, waited = [], 0.0
    for index in range(warmup + reps):
        start = time.perf_counter()
        real = real_source.take(r)
        took = time.perf_counter() - start
        step(real)
        if index >= warmup:
            seconds.append(time.perf_counter() - start)
            waited += took
    return seconds, waited


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device, args.threads)
    from online_stablerep.training.real_images import RealImageStream
    from online_stablerep.training.real_prefetch import PrefetchedRealImages

    step = build_step(args, device)
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    waited = dict.fromkeys(MODES, 0.0)
    with tempfile.TemporaryDirectory(prefix="bench-real-") as tmp:
        root = Path(tmp) / "photos"
        make_photos(root, classes=4, per_class=64, size=(500, 375))
        for block in range(args.blocks):
            for mode, depth in MODES.items():
                # A fresh stream each block, so both modes decode the same images.
                stream = RealImageStream(str(root), "a photo of a {}", args.output_size, 0, 1,
                                         seed=block)
                source = PrefetchedRealImages(stream, args.real, depth) if depth else stream
                took, wait = run_block(source, step, args.real, args.warmup, args.reps)
                if depth:
                    source.close()
                seconds[mode] += took
                waited[mode] += wait
                print(f"block {block} {mode}: {len(took) / sum(took):.2f} steps/s")
    rows = []
    for mode, depth in MODES.items():
        timing = Timing(seconds[mode])
        rows.append({"mode": mode, "prefetch_batches": depth, "real_per_step": args.real,
                     **timing.fields("step_s"), "steps_per_s": 1 / timing.median,
                     "wait_ms_per_step": 1e3 * waited[mode] / len(seconds[mode])})
    by_mode = {row["mode"]: row for row in rows}
    summary = {"prefetch_over_trainer_thread": by_mode["prefetch"]["steps_per_s"]
               / by_mode["trainer_thread"]["steps_per_s"]}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    paths = write_results("real-mix", device, settings, summary, rows, args.out)
    for row in rows:
        print(f"{row['mode']:>15}: {row['steps_per_s']:.2f} steps/s, "
              f"waits {row['wait_ms_per_step']:.1f} ms/step for real images")
    print(f"prefetch / trainer thread: {summary['prefetch_over_trainer_thread']:.3f} "
          f"({machine_name(device)}); wrote {paths['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
