"""Generation settings against what a backbone learns from them, with the toy model (CPU).

    python benchmarks/toy_experiments.py                          # full grid, 2 seeds
    python benchmarks/toy_experiments.py --train-steps 200 --seeds 0   # a reduced run

For each setting (guidance scale at the cpu_demo sampler steps; DPM-Solver++ steps at guidance
2) it measures, from the shipped toy model through the real DiffusionProducer:
- alignment: the toy classifier's top-1 against the caption's category (10 captions x k images);
- diversity: mean pairwise RMS pixel distance (images in [0, 1]) among a caption's k images,
  beside the same figure for k real renders of each category;
and, for each seed, trains the cpu_demo backbone in one colocated process
(`online-stablerep train --config cpu_demo roles.generators=0 train.steps=N ...`, the real
training path) on images made with that setting only, and reads its probe.json (linear top-1 and
k-NN top-1 on real renders). Every setting trains for the same number of steps.
Writes benchmarks/results/toy_experiments.json and toy_experiments.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from benchmarks.common import RESULTS_DIR, _figure
from online_stablerep.config import load_config
from online_stablerep.fractals import render_images
from online_stablerep.producers.diffusion import DiffusionProducer
from online_stablerep.producers.pipeline import SHIPPED_MODELS
from online_stablerep.toy.models import classify, load_classifier
from online_stablerep.toy.world import TOY_CATEGORIES, parse_caption

ROOT = Path(__file__).resolve().parents[1]


def diversity(images_kchw: torch.Tensor) -> float:
    """Mean pairwise RMS distance of k uint8 images, in [0, 1] units."""
    x = images_kchw.flatten(1).float() / 255
    d = torch.cdist(x, x) / x.shape[1] ** 0.5
    k = x.shape[0]
    return float(d.sum() / (k * (k - 1)))


def timed_call(cfg) -> tuple[list, float]:
    """One producer call of cfg's diffusion producer (built and closed here), and its seconds."""
    producer = DiffusionProducer(cfg, shard=0, num_shards=1)
    producer.start()
    try:
        t0 = time.perf_counter()
        groups = producer.next_groups()
        return groups, time.perf_counter() - t0
    finally:
        producer.close()


def sample_quality(overrides: list[str], k: int) -> dict[str, float]:
    """Alignment and diversity of k images of each toy caption at `overrides`."""
    cfg = load_config("cpu_demo", ["captions.shuffle=false", f"producer.images_per_caption={k}",
                                   f"producer.captions_per_call={TOY_CATEGORIES}", *overrides])
    groups, seconds = timed_call(cfg)
    images = torch.cat([g.images_kchw for g in groups])
    labels = torch.tensor([parse_caption(g.caption)[0] for g in groups]).repeat_interleave(k)
    pred = classify(load_classifier(SHIPPED_MODELS["toy"]), images)
    return {"alignment": float((pred == labels).float().mean()),
            "diversity": statistics.mean(diversity(g.images_kchw) for g in groups),
            "images_per_s": images.shape[0] / seconds}


def train_and_probe(overrides: list[str], seed: int, steps: int, workdir: Path) -> dict:
    """Train cpu_demo colocated on one setting's images; its probe.json."""
    out = workdir / f"run_{abs(hash((tuple(overrides), seed)))}"
    return run_probe(out, seed, [f"train.steps={steps}", *overrides])


def run_probe(out: Path, seed: int, overrides: list[str]) -> dict:
    """`online-stablerep train --config cpu_demo` colocated, one thread, into `out`, with a
    probe at the end; the seed, linear and k-NN top-1 and wall seconds of the run."""
    cmd = [sys.executable, "-m", "online_stablerep.cli", "train", "--config", "cpu_demo",
           f"output_dir={out}", "roles.generators=0", f"seed={seed}",
           "train.checkpoint_every=0", "train.image_grid_every=0", "eval.baselines=false",
           "train.cpu_threads=1", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    probe = json.loads((out / "probe.json").read_text())
    return {"seed": seed, "linear_top1": probe["linear_top1"], "knn_top1": probe["knn_top1"],
            "wall_s": round(time.perf_counter() - t0, 1)}


def plot(rows: list[dict], path: Path) -> None:
    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, sweep, xlabel in ((axes[0], "guidance", "guidance scale"),
                              (axes[1], "sampler_steps", "DPM-Solver++ steps")):
        part = sorted((r for r in rows if sweep in r["sweeps"]), key=lambda r: r[sweep])
        xs = [r[sweep] for r in part]
        for key, style in (("linear_top1", "o-"), ("knn_top1", "s--"), ("alignment", "^-"),
                           ("diversity", "x:")):
            ax.plot(xs, [r[key] for r in part], style, label=key)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel(xlabel)
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle("toy model: generation setting vs probe (real renders), alignment, diversity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--guidance", type=float, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--sampler-steps", type=int, nargs="+", default=[2, 4, 8, 20])
    parser.add_argument("--fixed-steps", type=int, default=4,
                        help="sampler steps of the guidance sweep (cpu_demo's)")
    parser.add_argument("--fixed-guidance", type=float, default=2.0,
                        help="guidance of the sampler-steps sweep")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--train-steps", type=int, default=600, help="backbone steps per run")
    parser.add_argument("--k", type=int, default=8, help="images per caption for quality")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings: dict[tuple[float, int], set[str]] = {}
    for g in args.guidance:
        settings.setdefault((g, args.fixed_steps), set()).add("guidance")
    for s in args.sampler_steps:
        settings.setdefault((args.fixed_guidance, s), set()).add("sampler_steps")
    rows = []
    real = render_images(load_config("cpu_demo"), [c for c in range(TOY_CATEGORIES)
                                                   for _ in range(args.k)],
                         [500_000 + j for _ in range(TOY_CATEGORIES) for j in range(args.k)])
    real_diversity = statistics.mean(diversity(real[c * args.k:(c + 1) * args.k])
                                     for c in range(TOY_CATEGORIES))
    with tempfile.TemporaryDirectory() as tmp:
        for (g, s), sweeps in tqdm(settings.items(), desc="settings"):
            overrides = [f"generator.guidance={g}", f"generator.steps={s}"]
            row = {"guidance": g, "sampler_steps": s, "sweeps": sorted(sweeps),
                   **sample_quality(overrides, args.k)}
            runs = [train_and_probe(overrides, seed, args.train_steps, Path(tmp))
                    for seed in args.seeds]
            row["runs"] = runs
            for key in ("linear_top1", "knn_top1"):
                row[key] = statistics.mean(r[key] for r in runs)
            rows.append(row)
            tqdm.write(json.dumps({k: v for k, v in row.items() if k != "runs"}))
    result = {
        "benchmark": "toy_experiments",
        "command": "python benchmarks/toy_experiments.py " + " ".join(argv or sys.argv[1:]),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "real_render_diversity": real_diversity,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "toy_experiments.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, args.out / "toy_experiments.png")
    print(f"wrote {args.out / 'toy_experiments.json'} and toy_experiments.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
