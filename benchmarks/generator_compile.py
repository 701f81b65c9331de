"""The torch.compile lever of the generator (`generator.compile=true`): our sampler with a
compiled UNet beside the stock pipeline on the SAME module uncompiled, same settings, alternating
runs after warm-up. Reports the compile warm-up and the largest pixel difference of the outputs.

    python benchmarks/generator_compile.py --device cpu    # tiny
    python benchmarks/generator_compile.py --device cuda   # sd15 at 512, bf16, dpm++ 20 steps

Writes benchmarks/results/generator-compile-<machine>.json (after each phase, so a run stopped
early still leaves what it measured).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import (
    machine_name,  # noqa: E402
    synchronize,  # noqa: E402
)
from benchmarks.generator import GUIDANCE, lever_run  # noqa: E402
from online_stablerep.producers.pipeline import build_components, stock_pipeline  # noqa: E402
from online_stablerep.producers.sampling import Sampler, initial_noise  # noqa: E402


def _timed(fn, device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    run = lever_run(argv, __doc__.splitlines()[0])
    args, device, s, prompts, ids = run.args, run.device, run.settings, run.prompts, run.ids
    n, k, steps = s["captions_per_call"], s["images_per_caption"], s["steps"]
    plain = build_components(run.base, device)
    compiled = dataclasses.replace(plain, unet=torch.compile(plain.unet, dynamic=False))
    ours = Sampler(compiled, steps=steps, vae_decode_chunk=8)
    pipe = stock_pipeline(plain)
    side = plain.resolution // plain.vae_scale_factor
    noise, _ = initial_noise(0, [(0, i) for i in ids], k, (plain.unet.config.in_channels, side, side))

    def run_ours() -> torch.Tensor:
        return ours.generate(prompts, [(0, i) for i in ids], [GUIDANCE] * n, k=k, seed=0,
                             output_size=plain.resolution)

    def run_stock() -> torch.Tensor:
        return pipe(prompts, num_images_per_prompt=k, num_inference_steps=steps,
                    guidance_scale=GUIDANCE, height=plain.resolution, width=plain.resolution,
                    latents=noise.to(device, plain.dtype), output_type="pt").images

    result = {"machine": machine_name(device), "settings": {**s, "guidance": GUIDANCE}}
    path = args.out_dir / f"generator-compile-{result['machine']}.json"
    args.out_dir.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        path.write_text(json.dumps(result, indent=2))

    # 1. Stock first (no compile involved), then the compile warm-up of ours.
    stock_out = run_stock()
    result["compile_warmup_s"] = _timed(run_ours, device)
    ours_out = run_ours().view(n * k, 3, plain.resolution, plain.resolution)
    stock_u8 = (stock_out.float().clamp(0, 1) * 255).round().to(torch.uint8)
    result["max_pixel_difference"] = int((ours_out.int() - stock_u8.int()).abs().max())
    save()
    # 2. Alternating timed runs.
    times: dict[str, list[float]] = {"ours_compiled": [], "stock": []}
    for _ in range(args.reps):
        times["stock"].append(_timed(run_stock, device))
        times["ours_compiled"].append(_timed(run_ours, device))
        rates = {name: statistics.median(n * k / t for t in ts) for name, ts in times.items()}
        result["images_per_s"] = rates
        result["speedup_vs_stock"] = rates["ours_compiled"] / rates["stock"]
        save()
    print(f"{result['machine']}: compiled ours {rates['ours_compiled']:.3f} images/s, stock "
          f"{rates['stock']:.3f}, x{result['speedup_vs_stock']:.3f}; compile warm-up "
          f"{result['compile_warmup_s']:.0f} s; max pixel difference "
          f"{result['max_pixel_difference']} -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
