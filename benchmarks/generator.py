"""Generator throughput, one harness for every generator benchmark: each recipe and each speed
lever beside the stock diffusers pipeline, in the same run.

    python benchmarks/generator.py                  # CPU: tiny architecture, ~6 minutes
    python benchmarks/generator.py --device cuda    # sd15 at 512, bf16: every recipe, ~5 min
    python benchmarks/generator.py --model toy      # any model (e.g. a trained one): diversity
    python benchmarks/generator.py --scenarios stock,paper,dpm20,fast

Scenarios (dataclasses below) are built once; then every timed round runs each scenario once
(device synchronised), so all of them share whatever load the machine has and their ratios
hold when absolute times drift. The first call of each scenario is its warm-up (compile
included, reported as `first_call_s`). `stock` is diffusers' StableDiffusionPipeline at the
`dpm20` recipe's settings (DPM-Solver++ 20 steps, guidance 2, full VAE, eager): lever rows change
one thing from those settings, so `speedup_vs_stock` is their ratio at equal settings; recipe
rows report it too, with `speedup_vs_paper` the ratio to the `paper` recipe (the official DDIM
50 steps). `stock_ddim50` is the stock pipeline at the paper's sampler: the `paper` recipe's
`speedup_vs_stock_same_sampler` is its ratio to that row (dpm20's to `stock`).

Adapters, distilled UNets and tiny VAEs are random-weight artefacts of the model's own
architecture (artefacts.py), saved and loaded through the diffusers paths a released one takes
(speed does not depend on the values); `--lora/--tiny-vae` take real ones instead.
`fraction_of_flop_limit` divides images/s x FLOPs per image (planning/flops.py, named
architectures only) by the device's bf16 peak, or on a CPU by a measured fp32 matmul rate.
`diversity` is the mean pairwise RMS distance between a caption's k images (in [0, 1] at 64
px): meaningful only with trained weights (`--model toy` or a checkpoint).

Writes benchmarks/results/generator-<machine>.{json,csv,png} after every round.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import itertools
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffusers
import torch
import torch.nn.functional as F

from benchmarks.common import (
    RESULTS_DIR,
    Timing,
    machine_name,
    plot_bars,
    resolve_device,
    synchronize,
    write_results,
)
from online_stablerep.config.recipes import RECIPES, recipe_levers
from online_stablerep.config.schema import CaptionsConfig, GeneratorConfig
from online_stablerep.planning.flops import (
    count_diffusion_flops,
    cuda_peak_flops,
    flops_per_generated_image,
)
from online_stablerep.producers import pipeline
from online_stablerep.producers.architectures import ARCHITECTURES
from online_stablerep.producers.artefacts import save_random_lora, save_random_tiny_vae
from online_stablerep.producers.captions import CaptionSource
from online_stablerep.producers.sampling import Sampler, plan_steps

GUIDANCE = 2.0

# Per device: model, resolution, dtype, n captions x k images a call, stored size, rounds.
DEFAULTS: dict[str, dict[str, Any]] = {
    # 32 px keeps 20-step calls around a second on one shared core.
    "cpu": {"model": "tiny", "resolution": 32, "dtype": "fp32", "captions": 1, "images": 4,
            "output_size": 32, "warmup": 1, "reps": 3},
    "cuda": {"model": "sd15", "resolution": 512, "dtype": "bf16", "captions": 4, "images": 4,
             "output_size": 256, "warmup": 1, "reps": 3},
}


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One measured configuration of the generator."""

    # Row name.
    name: str
    # "stock" (diffusers' pipeline), "lever" (one change from dpm20's eager settings) or
    # "recipe" (a named recipe, its levers as config/recipes.py sets them).
    kind: str
    # generator.* keys on top of dpm20's eager settings (stock, lever) or of the recipe.
    levers: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Recipe name for kind "recipe".
    recipe: str = ""
    # Measured only with --device cuda (e.g. compile modes whose warm-up is long on a CPU).
    cuda_only: bool = False


SCENARIOS: list[Scenario] = [
    Scenario("stock", "stock"),
    Scenario("stock_ddim50", "stock", {"scheduler": "ddim", "steps": 50}),
    Scenario("ours", "lever"),
    Scenario("paper", "recipe", recipe="paper"),
    Scenario("dpm20", "recipe", recipe="dpm20"),
    Scenario("fast", "recipe", recipe="fast"),
    Scenario("turbo", "recipe", recipe="turbo"),
    Scenario("fuse_qkv", "lever", {"fuse_qkv": True}),
    Scenario("tiny_vae", "lever", {"tiny_vae": "random"}),
    Scenario("guidance_first_half", "lever", {"guidance_interval": [0.0, 0.5]}),
    Scenario("deep_cache_2", "lever", {"deep_cache_every": 2}),
    Scenario("deep_cache_3", "lever", {"deep_cache_every": 3}),
    Scenario("compile", "lever", {"compile": True}),
    Scenario("compile_reduce_overhead", "lever",
             {"compile": True, "compile_mode": "reduce-overhead"}, cuda_only=True),
    Scenario("compile_max_autotune", "lever", {"compile": True, "compile_mode": "max-autotune"},
             cuda_only=True),
    # Measured 0.89x of contiguous on an H100 (generator-levers-nvidia-h100-80gb-hbm3.json).
    Scenario("channels_last", "lever", {"channels_last": True}, cuda_only=True),
    Scenario("paper_eager", "recipe", {"compile": False}, recipe="paper"),
    Scenario("dpm20_eager", "recipe", {"compile": False}, recipe="dpm20"),
    Scenario("fast_eager", "recipe", {"compile": False}, recipe="fast"),
]
# What --device cuda runs unless --scenarios says otherwise, most valuable first (rows are
# written as each is built, so a time limit cuts the tail): every recipe beside the stock
# pipeline at both samplers, then the levers whose warm-ups fit the ~5 minutes a GPU session
# gives this script.
CUDA_DEFAULT = ["stock", "paper", "dpm20", "stock_ddim50", "fast", "turbo", "ours", "fuse_qkv",
                "tiny_vae", "guidance_first_half", "deep_cache_2"]


def scenario_config(s: Scenario, base: GeneratorConfig, artefacts: dict[str, str]) -> GeneratorConfig:
    """The generator config of scenario `s`: recipe levers (with the adapter and tiny VAE made
    for this model in place of the hub ids) or one lever on dpm20's eager settings."""
    levers = dict(recipe_levers(s.recipe)) if s.kind == "recipe" else {}
    if levers.get("lora"):
        levers.update(lora=artefacts["lora"], lora_weight_name="")
    if levers.get("tiny_vae"):
        levers["tiny_vae"] = artefacts["tiny_vae"]
    levers.update(s.levers)
    if levers.get("tiny_vae") == "random":
        levers["tiny_vae"] = artefacts["tiny_vae"]
    return dataclasses.replace(base, recipe=s.recipe, **levers)


def diversity(images_nkchw: torch.Tensor) -> float:
    """Mean pairwise RMS distance between the k images of each caption, in [0, 1] units at
    64 px (so resolution does not change the scale)."""
    n, k = images_nkchw.shape[:2]
    x = images_nkchw.flatten(0, 1).float() / 255
    x = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    x = x.reshape(n, k, -1)
    distances = [(x[:, i] - x[:, j]).pow(2).mean(dim=1).sqrt()
                 for i, j in itertools.combinations(range(k), 2)]
    return float(torch.stack(distances).mean())


def cpu_matmul_flops() -> float:
    """FLOP/s of a large fp32 matmul on this CPU with the current threads: the CPU's limit."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 1024**3 / (time.perf_counter() - start)


def build_runner(s: Scenario, cfg: GeneratorConfig, device: torch.device, prompts: list[str],
                 k: int, output_size: int) -> Callable[[], torch.Tensor]:
    """A zero-argument call making one batch of n x k images: (n, k, 3, H, W) uint8."""
    n = len(prompts)
    components = pipeline.build_components(cfg, device)
    if s.kind == "stock":
        pipe = pipeline.stock_pipeline(components)

        def stock() -> torch.Tensor:
            images = pipe(prompts, num_images_per_prompt=k, num_inference_steps=cfg.steps,
                          guidance_scale=GUIDANCE, height=components.resolution,
                          width=components.resolution, output_type="pt").images
            return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).view(
                n, k, *images.shape[1:])
        return stock
    sampler = Sampler.from_config(components, cfg)
    keys = [(0, i) for i in range(n)]
    return lambda: sampler.generate(prompts, keys, [GUIDANCE] * n, k=k, seed=0,
                                    output_size=output_size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default=None,
                        help="generator.model: architecture, checkpoint or e.g. toy "
                             "(default: tiny on CPU, sd15 on CUDA)")
    parser.add_argument("--scenarios", default=None,
                        help=f"comma-separated subset of {', '.join(s.name for s in SCENARIOS)}")
    parser.add_argument("--lora", default="", help="a real adapter instead of a random one")
    parser.add_argument("--tiny-vae", default="", help="a real AutoencoderTiny instead")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0 = torch's default; 1 on shared machines)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    diffusers.utils.logging.set_verbosity_error()
    device = resolve_device(args.device, args.threads)
    # Every scenario starts from the same seeded random weights: initialise them once (a
    # full-size UNet takes seconds) and hand each scenario its own copy.
    random_parts = functools.cache(pipeline._build_random)
    pipeline._build_random = lambda name: copy.deepcopy(random_parts(name))
    d = DEFAULTS[args.device]
    model = args.model or d["model"]
    warmup = d["warmup"] if args.warmup is None else args.warmup
    reps = d["reps"] if args.reps is None else args.reps
    by_name = {s.name: s for s in SCENARIOS}
    if args.scenarios:
        names = [name.strip() for name in args.scenarios.split(",") if name.strip()]
        unknown = [name for name in names if name not in by_name]
        if unknown:
            parser.error(f"--scenarios: unknown {', '.join(unknown)}")
    elif device.type == "cuda":
        names = CUDA_DEFAULT
    else:
        names = [s.name for s in SCENARIOS if not s.cuda_only]
    scenarios = [by_name[name] for name in names]
    if "stock" not in names:
        parser.error("--scenarios must include stock (every ratio is to it)")

    # 1. dpm20's eager settings, random-weight artefacts of this model, the prompts.
    base = GeneratorConfig(model=model, resolution=d["resolution"], dtype=d["dtype"],
                           scheduler="dpm++", steps=20, guidance=str(GUIDANCE),
                           vae_decode_chunk=8)
    workdir = Path(tempfile.mkdtemp(prefix="generator_bench_"))
    plain = pipeline.build_components(base, device)
    scale_log2 = plain.vae_scale_factor.bit_length() - 1
    artefacts = {
        "lora": args.lora or str(save_random_lora(plain.unet, workdir / "lora", rank=8)),
        "tiny_vae": args.tiny_vae or str(save_random_tiny_vae(workdir / "taesd", scale_log2)),
    }
    del plain
    source = CaptionSource.open(CaptionsConfig())
    n, k = d["captions"], d["images"]
    prompts = [source.get(i) for i in range(n)]
    counted = count_diffusion_flops(model, d["resolution"]) if model in ARCHITECTURES else None
    if device.type == "cuda":
        limit = cuda_peak_flops(torch.cuda.get_device_name(device))
        limit_source = "bf16 peak of the device (planning/flops.py)"
    else:
        limit, limit_source = cpu_matmul_flops(), "measured fp32 1024x1024 matmul on this CPU"

    settings = {"model": model, "resolution": d["resolution"], "dtype": d["dtype"],
                "captions_per_call": n, "images_per_caption": k, "output_size": d["output_size"],
                "guidance": GUIDANCE, "steps": base.steps, "scheduler": base.scheduler,
                "warmup_rounds": warmup, "rounds": reps, "flop_limit": limit,
                "flop_limit_source": limit_source, "diffusers": diffusers.__version__,
                "artefacts": "given" if (args.lora or args.tiny_vae) else "random weights"}

    # 2. Build every scenario; its first call is its warm-up (compile happens there).
    rows: dict[str, dict[str, Any]] = {}
    solo: dict[str, list[float]] = {}
    runners: dict[str, Callable[[], torch.Tensor]] = {}
    for s in scenarios:
        cfg = scenario_config(s, base, artefacts)
        t0 = time.perf_counter()
        runners[s.name] = build_runner(s, cfg, device, prompts, k, d["output_size"])
        built = time.perf_counter() - t0
        synchronize(device)
        t0 = time.perf_counter()
        images = runners[s.name]()
        synchronize(device)
        first_call = time.perf_counter() - t0
        # One timed call straight away: a provisional rate written now, so a run stopped
        # during later warm-ups (compiles) still leaves every scenario measured so far.
        t1 = time.perf_counter()
        runners[s.name]()
        synchronize(device)
        solo[s.name] = [time.perf_counter() - t1]
        flops = None
        if counted is not None:
            flops = flops_per_generated_image(
                counted, cfg.steps, [GUIDANCE], k, tuple(cfg.guidance_interval),
                cfg.base_steps, cfg.deep_cache_every, bool(cfg.tiny_vae))
        rows[s.name] = {
            "scenario": s.name, "kind": s.kind, "recipe": s.recipe,
            "levers": ", ".join(f"{key}={value}" for key, value in sorted(s.levers.items())),
            "scheduler": cfg.scheduler, "steps": cfg.steps,
            "guided_steps": sum(kind.guided for kind in plan_steps(
                cfg.steps, tuple(cfg.guidance_interval), cfg.base_steps)),
            "base_steps": cfg.base_steps, "lora": bool(cfg.lora), "tiny_vae": bool(cfg.tiny_vae),
            "deep_cache_every": cfg.deep_cache_every, "fuse_qkv": cfg.fuse_qkv,
            "compile": cfg.compile, "compile_mode": cfg.compile_mode if cfg.compile else "",
            "build_s": built, "first_call_s": first_call,
            "flops_per_image": flops, "diversity": diversity(images.cpu()),
        }
        print(f"built {s.name}: {built:.1f} s, first call {rows[s.name]['first_call_s']:.1f} s",
              flush=True)
        if "stock" in rows:
            _write(rows, solo, n * k, limit, settings, device, args.out)

    # 3. Timed rounds, every scenario once per round; results written after each round.
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for index in range(warmup + reps):
        for name, run in runners.items():
            synchronize(device)
            t0 = time.perf_counter()
            run()
            synchronize(device)
            if index >= warmup:
                seconds[name].append(time.perf_counter() - t0)
        if index >= warmup:
            paths = _write(rows, seconds, n * k, limit, settings, device, args.out)
            print(f"round {index - warmup + 1}/{reps} -> {paths['json']}", flush=True)
    for row in rows.values():
        print(f"{row['scenario']:24s} {row['images_per_s']:9.3f} images/s  "
              f"x{row['speedup_vs_stock']:.2f} stock"
              + (f"  {row['fraction_of_flop_limit']:.1%} of the FLOP limit"
                 if row["fraction_of_flop_limit"] is not None else "")
              + f"  diversity {row['diversity']:.4f}")
    return 0


def _write(rows: dict[str, dict[str, Any]], seconds: dict[str, list[float]], images: int,
           limit: float | None, settings: dict[str, Any], device: torch.device,
           out: Path) -> dict[str, Path]:
    for name, row in rows.items():
        row.update(Timing(seconds[name]).rates(images, "images_per_s"))
        row["repetitions"] = len(seconds[name])
        flops = row["flops_per_image"]
        row["fraction_of_flop_limit"] = (row["images_per_s"] * flops / limit
                                         if flops and limit else None)
    stock = rows["stock"]["images_per_s"]
    paper = rows["paper"]["images_per_s"] if "paper" in rows else None
    stock_by_sampler = {(row["scheduler"], row["steps"]): row["images_per_s"]
                        for row in rows.values() if row["kind"] == "stock"}
    for row in rows.values():
        row["speedup_vs_stock"] = row["images_per_s"] / stock
        row["speedup_vs_paper"] = row["images_per_s"] / paper if paper else None
        same = stock_by_sampler.get((row["scheduler"], row["steps"]))
        row["speedup_vs_stock_same_sampler"] = row["images_per_s"] / same if same else None
    recipes = {row["recipe"]: {key: row[key] for key in (
        "images_per_s", "speedup_vs_stock", "speedup_vs_paper", "speedup_vs_stock_same_sampler",
        "fraction_of_flop_limit",
        "flops_per_image", "diversity", "steps")}
        for row in rows.values() if row["kind"] == "recipe" and row["compile"]
        and row["recipe"] in RECIPES}
    summary = {"stock_images_per_s": stock, "recipes": recipes,
               "levers": {row["scenario"]: row["speedup_vs_stock"] for row in rows.values()
                          if row["kind"] == "lever"}}
    paths = write_results("generator", device, settings, summary, list(rows.values()), out)
    plot_bars(out / f"generator-{machine_name(device)}.png",
              f"{settings['model']} on {device.type}: images/s per scenario (same run)",
              "images/s", [row["scenario"] for row in rows.values()],
              {"images/s": [row["images_per_s"] for row in rows.values()]},
              {"images/s": [(row["images_per_s_p25"], row["images_per_s_p75"])
                            for row in rows.values()]})
    return paths


if __name__ == "__main__":
    raise SystemExit(main())
