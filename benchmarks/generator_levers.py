"""Which throughput levers of the generator help on this device: our sampler with and without
channels_last and chunked VAE decode, beside the stock pipeline, same weights, alternating runs.

    python benchmarks/generator_levers.py --device cuda   # sd15 at 512, bf16, dpm++ 20 steps

Writes benchmarks/results/generator-levers-<machine>.json.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    machine_name,  # noqa: E402
    synchronize,  # noqa: E402
)
from benchmarks.generator import GUIDANCE, lever_run  # noqa: E402
from online_stablerep.producers.pipeline import build_components, stock_pipeline  # noqa: E402
from online_stablerep.producers.sampling import Sampler  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    run = lever_run(argv, __doc__.splitlines()[0])
    args, device, s, prompts, ids = run.args, run.device, run.settings, run.prompts, run.ids
    n, k, steps = s["captions_per_call"], s["images_per_caption"], s["steps"]
    contiguous = build_components(dataclasses.replace(run.base, channels_last=False), device)

    def ours(chunk: int):
        sampler = Sampler(contiguous, steps=steps, vae_decode_chunk=chunk)
        return lambda: sampler.generate(prompts, [(0, i) for i in ids], [GUIDANCE] * n, k=k, seed=0,
                                        output_size=s["output_size"])

    pipe = stock_pipeline(contiguous)

    def stock() -> None:
        pipe(prompts, num_images_per_prompt=k, num_inference_steps=steps,
             guidance_scale=GUIDANCE, height=contiguous.resolution,
             width=contiguous.resolution, output_type="pt")

    variants = {"ours_contiguous_chunk8": ours(8), "ours_contiguous_nochunk": ours(0),
                "stock": stock}
    # channels_last last: it converts the shared weights in place.
    times: dict[str, list[float]] = {name: [] for name in [*variants, "ours_channels_last_chunk8"]}
    for rep in range(1 + args.reps):
        for name, fn in variants.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            if rep:
                times[name].append(time.perf_counter() - t0)
    contiguous.unet.to(memory_format=torch.channels_last)
    contiguous.vae.to(memory_format=torch.channels_last)
    fn = ours(8)
    for rep in range(1 + args.reps):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        if rep:
            times["ours_channels_last_chunk8"].append(time.perf_counter() - t0)
    rates = {name: statistics.median(n * k / t for t in ts) for name, ts in times.items()}
    result = {"machine": machine_name(device), "settings": {**s, "guidance": GUIDANCE},
              "images_per_s": rates,
              "ratio_vs_stock": {name: r / rates["stock"] for name, r in rates.items()}}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"generator-levers-{result['machine']}.json"
    path.write_text(json.dumps(result, indent=2))
    for name, r in rates.items():
        print(f"{name:28s} {r:8.3f} images/s  x{r / rates['stock']:.3f} vs stock")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
