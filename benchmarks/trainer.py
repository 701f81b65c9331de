"""Trainer throughput: images/s and MFU of the project's Trainer step beside a plain PyTorch loop.

The DeepSpeed side is the real `Trainer.fit` loop (augmentation on the device, model,
StableRepLoss, engine backward and step), fed by a source that serves one fixed synthetic uint8
batch. The plain side trains the same model (build_model, same seed), loss and augmentation with
torch.optim.AdamW (autocast bf16 where the trainer runs bf16) on the same batch. The source runs
one plain step each time the trainer asks for a batch, so the two loops alternate step by step
and share whatever load the machine has; the ratio of their images/s is DeepSpeed's overhead.
FLOPs per step are counted on the meta device (planning.flops.count_train_flops); MFU divides
achieved FLOP/s by the device's bf16 peak and is null on a CPU.

    python benchmarks/trainer.py                    # CPU: resnet10t, vit_tiny at 64 px
    python benchmarks/trainer.py --device cuda      # GPU: ViT-S/16 and ViT-B/16 at 224, bf16
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import (
    Timing,
    add_common_arguments,
    machine_name,
    plot_bars,
    resolve_device,
    synchronize,
    write_results,
)
from online_stablerep.config import Config, load_config
from online_stablerep.planning.flops import count_train_flops, cuda_peak_flops
from online_stablerep.records import TrainBatch

# Per-device defaults: (config preset, backbones, image size, stored size, n, k, warmup, reps).
DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": {"config": "cpu_demo", "backbones": "resnet10t,vit_tiny_patch16_224",
            "image_size": 64, "input_size": 64, "captions": 16, "views": 2,
            "warmup": 3, "reps": 20},
    "cuda": {"config": "sd15_vitb16",
             "backbones": "vit_small_patch16_224,vit_base_patch16_224,vit_base_patch16_224+compile",
             "image_size": 224, "input_size": 256, "captions": 43, "views": 6,
             "warmup": 10, "reps": 30},
}


class InterleavedSource:
    """A BatchSource serving one batch forever to Trainer.fit, running one step of the plain
    loop between the trainer's steps.

    Interleaving step by step exposes both loops to the same machine load (other processes on
    a shared CPU), so their ratio holds even when absolute times drift. The trainer's step time
    is the gap from handing out one batch to the request for the next.
    """

    def __init__(self, batch: TrainBatch, device: torch.device,
                 plain_step: Callable[[], None], progress: Any) -> None:
        from online_stablerep.replay import ReplayBuffer

        self.batch = batch
        self.device = device
        self.plain_step = plain_step
        self.progress = progress
        self.buffer = ReplayBuffer(capacity=1, max_reuse=1)
        self.trainer_seconds: list[float] = []
        self.plain_seconds: list[float] = []
        self._handed_out: float | None = None

    def next_batch(self) -> TrainBatch:
        synchronize(self.device)
        start = time.perf_counter()
        if self._handed_out is not None:
            self.trainer_seconds.append(start - self._handed_out)
        self.plain_step()
        synchronize(self.device)
        self._handed_out = time.perf_counter()
        self.plain_seconds.append(self._handed_out - start)
        self.progress.update(1)
        return self.batch

    def idle_seconds(self) -> float:
        return 0.0

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def snapshot(self, buffer_contents: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.buffer.state_dict(buffer_contents), {}

    def close(self) -> None:
        self.buffer.close()


def synthetic_batch(n: int, k: int, size: int, seed: int) -> TrainBatch:
    """n caption groups x k views of random uint8 pixels, view-major like the replay buffer's."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (k * n, 3, size, size), dtype=torch.uint8, generator=generator)
    return TrainBatch(images=images, caption_ids=torch.arange(n).repeat(k),
                      captions=[f"caption {i}" for i in range(n)], views_per_caption=k,
                      captions_per_batch=n)


def plain_loop(cfg: Config, batch: TrainBatch, device: torch.device) -> Callable[[], None]:
    """One step of a plain PyTorch loop: same model and seed, loss, augmentation and batch."""
    from online_stablerep.losses import StableRepLoss
    from online_stablerep.models.encoder import build_model
    from online_stablerep.training.augment import DeviceAugment
    from online_stablerep.training.engine import peak_lr, use_autocast, use_bf16
    from online_stablerep.training.schedule import param_groups

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(device).train()
    loss_fn = StableRepLoss(cfg.loss)
    augment = DeviceAugment(cfg.augment, cfg.model.image_size)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=peak_lr(cfg, 1),
                                  betas=(o.beta1, o.beta2), fused=o.fused)
    if cfg.train.compile:
        model.compile()
    bf16 = use_bf16(cfg, device) or use_autocast(cfg)
    k = batch.views_per_caption

    def step() -> None:
        views = augment(batch.images.to(device, non_blocking=True), generator)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            outputs = model(views, views_per_caption=k)
        loss = loss_fn(outputs, batch.caption_ids.to(device))["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()  # the Trainer reads the loss every step too

    return step


def time_both(cfg: Config, batch: TrainBatch, device: torch.device, warmup: int,
              groups: Any) -> dict[str, Timing]:
    """Step times of the project's Trainer.fit and of the plain loop, interleaved step by step
    (warm-up steps dropped)."""
    from tqdm import tqdm

    from online_stablerep.training.trainer import Trainer

    plain_step = plain_loop(cfg, batch, device)
    with tqdm(total=cfg.train.steps, desc=cfg.model.backbone, leave=False,
              mininterval=1.0) as progress:
        source = InterleavedSource(batch, device, plain_step, progress)
        Trainer(cfg, groups, source, device).fit()
    # fit() asks for train.steps batches: steps - 1 trainer gaps, steps plain steps.
    return {"deepspeed": Timing(source.trainer_seconds[warmup:]),
            "plain": Timing(source.plain_seconds[warmup + 1:])}


def benchmark_config(args: argparse.Namespace, backbone: str, out_dir: str) -> Config:
    """`backbone` is a timm name, with "+compile" for the torch.compile'd model."""
    name, _, flag = backbone.partition("+")
    overrides = [
        f"output_dir={out_dir}",
        f"model.backbone={name}",
        f"train.compile={flag == 'compile'}",
        f"model.image_size={args.image_size}",
        f"batch.captions_per_batch={args.captions}",
        f"batch.views_per_caption={args.views}",
        f"producer.images_per_caption={max(args.views, 2)}",
        f"train.precision={args.precision}",
        f"train.steps={args.warmup + args.reps + 1}",
        f"train.log_every={args.warmup + args.reps + 1}",
        "train.checkpoint_every=0",
        "train.image_grid_every=0",
        "replay.checkpoint_contents=false",
        "optim.warmup_steps=1",
    ]
    return load_config(args.config, overrides)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, warmup=-1, reps=-1)
    parser.add_argument("--config", default=None, help="preset the model/optim settings come from")
    parser.add_argument("--backbones", default=None,
                        help="comma-separated timm model names; NAME+compile: torch.compile'd")
    parser.add_argument("--image-size", type=int, default=None, help="side of the trained views")
    parser.add_argument("--input-size", type=int, default=None, help="side of the stored images")
    parser.add_argument("--captions", type=int, default=None, help="n: caption groups per batch")
    parser.add_argument("--views", type=int, default=None, help="k: views per caption group")
    parser.add_argument("--precision", default="auto",
                        choices=["auto", "bf16", "autocast_bf16", "fp32"])
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) in (None, -1):
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device, args.threads)
    import torch.distributed as dist

    from online_stablerep.distributed.groups import create_groups, init_with_deepspeed
    from online_stablerep.distributed.process import single_process_env
    from online_stablerep.distributed.roles import Roles
    from online_stablerep.training.engine import use_autocast, use_bf16

    # 1. A world of one rank, set up exactly as the training job does it.
    single_process_env()
    init_with_deepspeed(device, timeout_s=600)
    peak = cuda_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    rows: list[dict[str, Any]] = []
    try:
        groups = create_groups(Roles(world_size=1, num_generators=0), device, 600)
        for backbone in args.backbones.split(","):
            with tempfile.TemporaryDirectory(prefix="bench-trainer-") as out_dir:
                cfg = benchmark_config(args, backbone, out_dir)
                batch = synthetic_batch(args.captions, args.views, args.input_size, cfg.seed)
                rows_per_step = args.captions * args.views
                # 2. FLOPs of one forward + backward, counted on the meta device.
                step_flops = count_train_flops(cfg, rows_per_step)
                # 3. The project's Trainer and the plain loop, step by step in turn.
                timings = time_both(cfg, batch, device, args.warmup, groups)
                for engine, timing in timings.items():
                    achieved = step_flops / timing.median
                    rows.append({
                        "backbone": backbone, "engine": engine, "image_size": args.image_size,
                        "input_size": args.input_size, "captions": args.captions,
                        "views": args.views, "rows": rows_per_step,
                        "precision": ("bf16" if use_bf16(cfg, device) else "autocast_bf16"
                                      if use_autocast(cfg) else "fp32"),
                        **timing.fields("step_s"), **timing.rates(rows_per_step, "images_per_s"),
                        "flops_per_step": step_flops, "tflops_per_s": achieved / 1e12,
                        "mfu": achieved / peak if peak else None,
                    })
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        dist.destroy_process_group()
    return report(args, device, rows)


def report(args: argparse.Namespace, device: torch.device, rows: list[dict[str, Any]]) -> int:
    """Print the table, write JSON/CSV/PNG; returns the exit code."""
    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    by = {(r["backbone"], r["engine"]): r for r in rows}
    summary = {"by_backbone": {}}
    print(f"\ntrainer throughput on {machine_name(device)} "
          f"(n={args.captions} x k={args.views}, {args.image_size} px):")
    print(f"{'backbone':<28} {'engine':<10} {'images/s':>10} {'IQR':>17} {'TFLOP/s':>8} "
          f"{'MFU':>6}")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        iqr = f"{r['images_per_s_p25']:.1f}-{r['images_per_s_p75']:.1f}"
        print(f"{r['backbone']:<28} {r['engine']:<10} {r['images_per_s']:>10.1f} {iqr:>17} "
              f"{r['tflops_per_s']:>8.3f} {mfu:>6}")
    for name in backbones:
        ds, plain = by[(name, "deepspeed")], by[(name, "plain")]
        ratio = ds["images_per_s"] / plain["images_per_s"]
        summary["by_backbone"][name] = {
            "deepspeed_images_per_s": ds["images_per_s"], "plain_images_per_s":
            plain["images_per_s"], "deepspeed_over_plain": ratio, "mfu_deepspeed": ds["mfu"],
        }
        print(f"{name}: deepspeed / plain = {ratio:.3f}")
    summary["images_per_s"] = summary["by_backbone"][backbones[0]]["deepspeed_images_per_s"]
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    paths = write_results("trainer", device, settings, summary, rows, args.out)
    plot = plot_bars(
        args.out / f"trainer-{machine_name(device)}.png",
        f"trainer images/s on {machine_name(device)} ({args.image_size} px, "
        f"n={args.captions} x k={args.views})",
        "images/s (median, IQR)", backbones,
        {e: [by[(b, e)]["images_per_s"] for b in backbones] for e in ("deepspeed", "plain")},
        {e: [(by[(b, e)]["images_per_s_p25"], by[(b, e)]["images_per_s_p75"]) for b in backbones]
         for e in ("deepspeed", "plain")},
    )
    print(f"wrote {paths['json']}, {paths['csv']}, {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
