"""Is the 20-step DPM-Solver++ recipe equivalent to the paper's DDIM-50? On the toy model (CPU).

    python benchmarks/sampler_equivalence.py                      # 5 seeds, ~5 min on one core
    python benchmarks/sampler_equivalence.py --recipes paper dpm20 fast --seeds 0 1 2

For each recipe and each generation seed (`producer.seed`: new noise for every image), the
shipped toy model makes k images of each of its 10 plain captions at guidance 2.0 through the real
DiffusionProducer (compile off, as on any CPU), and we measure:
- alignment: the shipped classifier's top-1 against the caption's category;
- diversity: mean pairwise RMS pixel distance (images in [0, 1]) among a caption's k images;
- distance to the first recipe: RMS pixel distance between the two recipes' images made from the
  same initial noise (both samplers solve the same ODE; 0 = the same image), to put beside
  diversity (how far apart two different images of one caption are).
Each figure is reported as mean and 95% CI over the seeds. Whether an encoder trained on each
sampler's images learns the same is a separate, slower experiment (the sampler-vs-encoder table,
benchmarks/README.md); its teacher rows use `generator.recipe=paper` and `generator.recipe=dpm20`.
Writes benchmarks/results/sampler-equivalence-toy.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import RESULTS_DIR
from benchmarks.toy_experiments import diversity, timed_call
from online_stablerep.config import load_config
from online_stablerep.producers.pipeline import SHIPPED_MODELS
from online_stablerep.toy.models import classify, load_classifier
from online_stablerep.toy.world import TOY_CATEGORIES, parse_caption

# Two-sided 95% quantiles of Student's t by degrees of freedom (no scipy in the environment).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
       9: 2.262, 10: 2.228}


def mean_ci(values: list[float]) -> dict[str, float]:
    """Mean and the half-width of its 95% confidence interval (t over the seeds)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return {"mean": mean, "ci95": math.nan}
    half = T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "ci95": half}


def generate(recipe: str, seed: int, k: int, guidance: float) -> tuple[torch.Tensor, list[int],
                                                                        float]:
    """(10, k, 3, 32, 32) uint8 images of the toy captions, their categories, seconds taken."""
    cfg = load_config("cpu_demo", [
        "captions.shuffle=false", f"producer.images_per_caption={k}", "batch.views_per_caption=2",
        f"producer.captions_per_call={TOY_CATEGORIES}", f"producer.seed={seed}",
        f"generator.recipe={recipe}", "generator.compile=false", f"generator.guidance={guidance}"])
    groups, seconds = timed_call(cfg)
    groups = sorted(groups, key=lambda g: g.caption_id)
    return (torch.stack([g.images_kchw for g in groups]),
            [parse_caption(g.caption)[0] for g in groups], seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["paper", "dpm20"],
                        help="generator recipes; the first is the reference of `distance`")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--k", type=int, default=10, help="images per caption (the paper's 10)")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    classifier = load_classifier(SHIPPED_MODELS["toy"])
    per_seed: dict[str, list[dict[str, float]]] = {r: [] for r in args.recipes}
    for seed in args.seeds:
        reference = None
        for recipe in args.recipes:
            images, labels, seconds = generate(recipe, seed, args.k, args.guidance)
            flat = images.flatten(0, 1)
            pred = classify(classifier, flat)
            truth = torch.tensor(labels).repeat_interleave(args.k)
            row = {"alignment": float((pred == truth).float().mean()),
                   "diversity": statistics.mean(diversity(g) for g in images),
                   "seconds": seconds}
            if reference is None:
                reference = flat
            else:
                x, y = flat.float() / 255, reference.float() / 255
                row["distance"] = float((x - y).flatten(1).pow(2).mean(1).sqrt().mean())
            per_seed[recipe].append(row)
            print(json.dumps({"seed": seed, "recipe": recipe, **row}), flush=True)
    rows = []
    for recipe, runs in per_seed.items():
        row = {"recipe": recipe, "runs": runs}
        for key in ("alignment", "diversity", "distance", "seconds"):
            if key in runs[0]:
                row[key] = mean_ci([r[key] for r in runs])
        rows.append(row)
        print(f"{recipe:8s} " + "  ".join(
            f"{key} {row[key]['mean']:.4f} ± {row[key]['ci95']:.4f}"
            for key in ("alignment", "diversity", "distance") if key in row))
    result = {"benchmark": "sampler_equivalence", "model": "toy",
              "command": "python benchmarks/sampler_equivalence.py " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              "settings": {k: str(v) if isinstance(v, Path) else v
                           for k, v in vars(args).items()},
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "sampler-equivalence-toy.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
