"""Generator throughput: our sampling loop beside the stock diffusers pipeline, same run.

    python benchmarks/generator.py --device cpu    # tiny architecture, under 3 minutes
    python benchmarks/generator.py --device cuda   # sd15 at 512, bf16, dpm++ 20 steps, guidance 2

Both sides use the same weights, scheduler, steps, guidance and images per call; the stock side
is `StableDiffusionPipeline` (no safety checker, output_type="pt") with diffusers' defaults for
memory format and attention. Measurements alternate between the two, after warm-up, and report
median and spread. Writes benchmarks/results/generator-<machine>.{json,csv,png}.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffusers
import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from benchmarks.common import machine_name, synchronize
from online_stablerep.config.schema import CaptionsConfig, GeneratorConfig
from online_stablerep.planning.flops import cuda_peak_flops
from online_stablerep.producers.captions import CaptionSource
from online_stablerep.producers.pipeline import (
    SCHEDULERS,
    Components,
    build_components,
    stock_pipeline,
)
from online_stablerep.producers.sampling import Sampler

SETTINGS = {
    "cpu": {"model": "tiny", "resolution": 0, "dtype": "fp32", "captions_per_call": 2,
            "images_per_caption": 2, "steps": 4, "output_size": 64, "batch_sweep": [1, 2, 4],
            "steps_sweep": [2, 4], "scheduler_steps": 2, "schedulers": list(SCHEDULERS),
            "warmup": 1, "reps": 3},
    # Sized for the ~2.5 minutes one GPU session can spend here; a scheduler's cost per step is
    # the UNet's, so one other scheduler stands for the rest.
    "cuda": {"model": "sd15", "resolution": 512, "dtype": "bf16", "captions_per_call": 4,
             "images_per_caption": 4, "steps": 20, "output_size": 256,
             "batch_sweep": [1, 4, 8], "steps_sweep": [20], "scheduler_steps": 20,
             "schedulers": ["unipc"], "warmup": 1, "reps": 3},
}
GUIDANCE = 2.0
DEFAULT_SCHEDULER = "dpm++"


@dataclasses.dataclass
class LeverRun:
    """What the lever benchmarks share: parsed arguments, device, settings, and the prompts."""

    args: argparse.Namespace
    device: torch.device
    settings: dict
    base: GeneratorConfig
    prompts: list[str]
    ids: list[int]


def lever_run(argv: list[str] | None, description: str) -> LeverRun:
    """Parse `--device --reps --out-dir` and prepare the default settings of this device."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    diffusers.utils.logging.set_verbosity_error()
    s = SETTINGS[args.device]
    base = GeneratorConfig(model=s["model"], resolution=s["resolution"], dtype=s["dtype"],
                           steps=s["steps"])
    source = CaptionSource.open(CaptionsConfig())
    n = s["captions_per_call"]
    return LeverRun(args, torch.device(args.device), s, base,
                    [source.get(i) for i in range(n)], list(range(n)))


def measure_point(ours: Components, stock: Components, captions: list[str], scheduler: str,
                  n: int, steps: int, s: dict) -> dict:
    """Images/s of both sides at one setting, alternating runs."""
    k, device = s["images_per_caption"], ours.device
    cls = SCHEDULERS[scheduler]
    sampler = Sampler(dataclasses.replace(ours, scheduler_cls=cls), steps=steps,
                      vae_decode_chunk=8)
    pipe = stock_pipeline(dataclasses.replace(stock, scheduler_cls=cls))
    prompts, ids = captions[:n], list(range(n))

    def run_ours() -> None:
        sampler.generate(prompts, [(0, i) for i in ids], [GUIDANCE] * n, k=k, seed=0, output_size=s["output_size"])

    def run_stock() -> None:
        pipe(prompts, num_images_per_prompt=k, num_inference_steps=steps, guidance_scale=GUIDANCE,
             height=stock.resolution, width=stock.resolution, output_type="pt")

    times: dict[str, list[float]] = {"ours": [], "stock": []}
    for rep in range(s["warmup"] + s["reps"]):
        for name, fn in (("ours", run_ours), ("stock", run_stock)):
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            if rep >= s["warmup"]:
                times[name].append(time.perf_counter() - t0)
    row = {"scheduler": scheduler, "captions_per_call": n, "images_per_caption": k,
           "steps": steps}
    for name, ts in times.items():
        rates = [n * k / t for t in ts]
        row[f"{name}_images_per_s"] = statistics.median(rates)
        row[f"{name}_spread"] = max(rates) - min(rates)
    row["speedup"] = row["ours_images_per_s"] / row["stock_images_per_s"]
    return row


def unet_flops_per_image_step(c: Components, n: int, k: int) -> float:
    """FLOPs of one guided UNet call (2nk rows), per image."""
    side = c.resolution // c.vae_scale_factor
    rows = 2 * n * k
    x = torch.randn(rows, c.unet.config.in_channels, side, side, device=c.device, dtype=c.dtype)
    context = torch.randn(rows, 77, c.unet.config.cross_attention_dim, device=c.device,
                          dtype=c.dtype)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        c.unet(x, 500, encoder_hidden_states=context)
    return counter.get_total_flops() / (n * k)


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (key, group) in zip(axes, (("captions_per_call", "batch"), ("steps", "steps"),
                                       ("scheduler", "scheduler")), strict=True):
        subset = [r for r in rows if r["sweep"] == group]
        xs = [str(r[key]) for r in subset]
        for side, marker in (("ours", "o"), ("stock", "s")):
            ax.errorbar(xs, [r[f"{side}_images_per_s"] for r in subset],
                        yerr=[r[f"{side}_spread"] / 2 for r in subset], marker=marker,
                        capsize=3, label=side)
        ax.set_xlabel(key)
        ax.set_ylabel("images/s")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    diffusers.utils.logging.set_verbosity_error()
    device = torch.device(args.device)
    s = SETTINGS[args.device]
    base = GeneratorConfig(model=s["model"], resolution=s["resolution"], dtype=s["dtype"],
                           scheduler=DEFAULT_SCHEDULER, steps=s["steps"])
    ours = build_components(base, device)
    # The stock side gets diffusers' defaults (contiguous weights, SDPA); same seed, same weights.
    stock = build_components(dataclasses.replace(base, channels_last=False), device)
    source = CaptionSource.open(CaptionsConfig())
    captions = [source.get(i) for i in range(max(s["batch_sweep"]))]

    n, steps = s["captions_per_call"], s["steps"]
    plan = [("batch", DEFAULT_SCHEDULER, b, steps) for b in s["batch_sweep"]]
    plan += [("steps", DEFAULT_SCHEDULER, n, st) for st in s["steps_sweep"] if st != steps]
    plan += [("scheduler", name, n, s["scheduler_steps"]) for name in s["schedulers"]]
    rows = []
    for sweep, scheduler, batch, point_steps in tqdm(plan, desc="generator benchmark"):
        row = measure_point(ours, stock, captions, scheduler, batch, point_steps, s)
        rows.append({"sweep": sweep, **row})
        tqdm.write(f"{sweep:9s} {scheduler:5s} n={batch} steps={point_steps}: ours "
                   f"{row['ours_images_per_s']:.3f} stock {row['stock_images_per_s']:.3f} "
                   f"images/s (x{row['speedup']:.3f})")
    default = next(r for r in rows if r["sweep"] == "batch" and r["captions_per_call"] == n)

    flops = unet_flops_per_image_step(ours, n, s["images_per_caption"])
    unet_tflops = flops * steps * default["ours_images_per_s"] / 1e12
    name = machine_name(device)
    peak = cuda_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    result = {
        "machine": name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "settings": {**{k: v for k, v in s.items() if not k.endswith("sweep")},
                     "scheduler": DEFAULT_SCHEDULER, "guidance": GUIDANCE,
                     "resolution": ours.resolution},
        "speedup_vs_stock": default["speedup"],
        "ours_images_per_s": default["ours_images_per_s"],
        "stock_images_per_s": default["stock_images_per_s"],
        "unet_gflop_per_image_step_with_cfg": flops / 1e9,
        "unet_tflops_per_s": unet_tflops,
        "mfu": unet_tflops * 1e12 / peak if peak else None,
        "sweep": rows,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"generator-{name}"
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2))
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, Path(f"{stem}.png"), f"{s['model']} on {result['device']}: images/s, ours vs stock")
    print(f"{name}: ours {default['ours_images_per_s']:.2f} images/s, stock "
          f"{default['stock_images_per_s']:.2f} images/s, speedup_vs_stock "
          f"{default['speedup']:.3f}; UNet {unet_tflops:.3g} TFLOP/s"
          + (f", MFU {result['mfu']:.1%}" if peak else "") + f" -> {stem}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
