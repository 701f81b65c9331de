"""Sampler settings of the toy model against what they cost and what an encoder learns from them
(issue 22): the teacher at the paper's and at few steps, the distilled LCM-LoRA student at 4, 2
and 1 steps, with and without the teacher's first step, guidance on and off. One run, CPU.

    python benchmarks/sampler_table.py                  # the table (CPU, one thread)
    python benchmarks/sampler_table.py --quick --out /tmp/t   # a smoke run (tests)

Every setting is cpu_demo's generator (the shipped toy model, guidance "small" = 2 or 3 per
caption) with the setting's levers, eager (generator.compile=false for every row: on a CPU the
compile warm-up would dominate), one thread. Each setting gets its own DiffusionProducer (the
real producer path) making 10 captions x k images a call; calls go round-robin, one call of
every setting per round, so all settings share whatever load the machine has:
- images/s: k x 10 / the median call time over the timed rounds (after one warm-up round), and
  its ratio to `paper` (the paper's sampler: DDIM 50 steps, eta 0, guidance on every step);
- alignment: the shipped classifier's top-1 against the caption's category;
- diversity within a caption's group: mean pairwise RMS pixel distance ([0, 1] units) and the
  mean pairwise distance of L2-normalised features of the frozen toy classifier (trained on
  real renders only; it sees shape, pose and place, not colour), real renders' figures beside;
- encoder: for the --encoder settings, the groups made (topped up to --pool-rounds calls) are
  written to WebDataset shards, and cpu_demo trains on them alone (`online-stablerep train
  --config cpu_demo producer.kind=shards shards.path=... train.steps=N seed=S`, colocated, one
  thread) for each seed; its probe.json (linear probe and k-NN on held-out real renders) gives
  mean and 95% CI (Student t) over seeds. Each encoder sees the same number of stored images,
  so generation speed does not enter its score.
Writes <out>/sampler_table.json and sampler_table.md.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmarks.common import RESULTS_DIR
from benchmarks.toy_experiments import run_probe
from online_stablerep.config import load_config
from online_stablerep.fractals import render_images
from online_stablerep.producers.diffusion import DiffusionProducer
from online_stablerep.producers.shipped import SHIPPED_MODELS
from online_stablerep.records import CaptionGroup
from online_stablerep.shards.writer import ShardWriter
from online_stablerep.toy.models import CategoryClassifier, classify, load_classifier
from online_stablerep.toy.world import TOY_CATEGORIES, parse_caption

ROOT = Path(__file__).resolve().parents[1]

# name -> generator overrides on cpu_demo. "fast" is the toy model's fast recipe: the LCM-LoRA
# student at 4 LCM steps, the first step run by the teacher with guidance.
_STUDENT = ["generator.recipe=fast", "generator.compile=false"]
_PAPER = ["generator.recipe=paper", "generator.compile=false"]
# The few-step teacher rows step down from the 20-step DPM-Solver++ recipe.
_TEACHER = ["generator.recipe=dpm20", "generator.compile=false"]
_NO_BASE = ["generator.base_steps=0", "generator.guidance_interval=[0.0,0.0]"]
SETTINGS: dict[str, list[str]] = {
    "paper": _PAPER,
    "dpm20": _TEACHER,
    "teacher_dpm4": [*_TEACHER, "generator.steps=4"],
    "teacher_dpm2": [*_TEACHER, "generator.steps=2"],
    "teacher_dpm4_noguid": [*_TEACHER, "generator.steps=4", "generator.guidance=1.0"],
    "student_lcm4": [*_STUDENT, *_NO_BASE],
    "student_lcm2": [*_STUDENT, *_NO_BASE, "generator.steps=2"],
    "student_lcm1": [*_STUDENT, *_NO_BASE, "generator.steps=1"],
    "student_lcm4_guided": [*_STUDENT, "generator.base_steps=0",
                            "generator.guidance_interval=[0.0,1.0]"],
    "fast": _STUDENT,
    "student_lcm2_base1": [*_STUDENT, "generator.steps=2"],
}
DESCRIPTIONS = {
    "paper": "teacher, DDIM 50 steps eta 0, guided (the paper's sampler, `paper` recipe)",
    "dpm20": "teacher, DPM-Solver++ 20 steps, guided (`dpm20` recipe)",
    "teacher_dpm4": "teacher, DPM-Solver++ 4 steps, guided (cpu_demo until now)",
    "teacher_dpm2": "teacher, DPM-Solver++ 2 steps, guided",
    "teacher_dpm4_noguid": "teacher, DPM-Solver++ 4 steps, guidance off",
    "student_lcm4": "student, 4 LCM steps, guidance off (baked in)",
    "student_lcm2": "student, 2 LCM steps, guidance off",
    "student_lcm1": "student, 1 LCM step, guidance off",
    "student_lcm4_guided": "student, 4 LCM steps, CFG on every step",
    "fast": "student, 4 LCM steps, teacher's guided first step (toy `fast` recipe)",
    "student_lcm2_base1": "student, 2 LCM steps, teacher's guided first step",
}
DEFAULT_SETTINGS = list(SETTINGS)
ENCODER_DEFAULT = ["paper", "teacher_dpm4", "fast", "student_lcm4"]
# Two-sided 95% Student t quantiles by degrees of freedom.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student t; 0 for one value)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, _T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def pairwise(x_kd: torch.Tensor) -> float:
    """Mean pairwise Euclidean distance of k rows."""
    k = x_kd.shape[0]
    return float(torch.cdist(x_kd, x_kd).sum() / (k * (k - 1)))


def pixel_diversity(images_kchw: torch.Tensor) -> float:
    """Mean pairwise RMS distance of k uint8 images, in [0, 1] units (toy_experiments' figure)."""
    x = images_kchw.flatten(1).float() / 255
    return pairwise(x) / x.shape[1] ** 0.5


@torch.inference_mode()
def feature_diversity(classifier: CategoryClassifier, images_kchw: torch.Tensor) -> float:
    """Mean pairwise distance of the frozen classifier's L2-normalised pooled features."""
    classifier.eval()
    x = images_kchw.float() / 255
    return pairwise(F.normalize(classifier.features(x * 2 - 1).mean(dim=(2, 3)), dim=1))


def group_metrics(classifier: CategoryClassifier, groups: list[CaptionGroup]) -> dict[str, float]:
    """Alignment and the two diversity figures of a setting's groups."""
    images = torch.cat([g.images_kchw for g in groups])
    k = groups[0].images_kchw.shape[0]
    labels = torch.tensor([parse_caption(g.caption)[0] for g in groups]).repeat_interleave(k)
    return {
        "alignment": float((classify(classifier, images) == labels).float().mean()),
        "pixel_diversity": statistics.mean(pixel_diversity(g.images_kchw) for g in groups),
        "feature_diversity": statistics.mean(feature_diversity(classifier, g.images_kchw)
                                             for g in groups),
    }


def real_metrics(classifier: CategoryClassifier, k: int) -> dict[str, float]:
    """The diversity figures of k real renders per category (held-out image indices)."""
    cfg = load_config("cpu_demo")
    real = render_images(cfg, [c for c in range(TOY_CATEGORIES) for _ in range(k)],
                         [500_000 + j for _ in range(TOY_CATEGORIES) for j in range(k)])
    groups = [real[c * k:(c + 1) * k] for c in range(TOY_CATEGORIES)]
    return {"pixel_diversity": statistics.mean(pixel_diversity(g) for g in groups),
            "feature_diversity": statistics.mean(feature_diversity(classifier, g) for g in groups)}


def make_producer(name: str, k: int) -> DiffusionProducer:
    cfg = load_config("cpu_demo", ["captions.shuffle=false", f"producer.images_per_caption={k}",
                                   f"producer.captions_per_call={TOY_CATEGORIES}",
                                   *SETTINGS[name]])
    producer = DiffusionProducer(cfg, shard=0, num_shards=1, device="cpu")
    producer.start()
    return producer


def train_and_probe(shards: Path, seed: int, steps: int, workdir: Path) -> dict[str, Any]:
    """cpu_demo trained colocated on the stored groups only; its probe.json figures."""
    return run_probe(workdir / f"{shards.name}_seed{seed}", seed,
                     ["producer.kind=shards", f"shards.path={shards}", f"train.steps={steps}"])


def write_shards(groups: list[CaptionGroup], directory: Path) -> None:
    writer = ShardWriter(directory, rank=0)
    for group in groups:
        writer.put(group)
    writer.close()


def markdown(result: dict[str, Any]) -> str:
    """The table as docs/toy-model.md shows it."""
    real = result["real"]
    lines = ["| setting | images/s | × paper | alignment | pixel div. | feature div. "
             "| linear probe (95% CI) | k-NN |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        enc = row.get("encoder")
        probe = (f"{enc['linear_top1'][0]:.3f} ± {enc['linear_top1'][1]:.3f}" if enc else "")
        knn = f"{enc['knn_top1'][0]:.3f}" if enc else ""
        lines.append(f"| {row['name']}: {DESCRIPTIONS[row['name']]} | {row['images_per_s']:.1f} "
                     f"| {row['speedup_vs_paper']:.2f} | {row['alignment']:.3f} "
                     f"| {row['pixel_diversity']:.3f} | {row['feature_diversity']:.3f} "
                     f"| {probe} | {knn} |")
    lines.append(f"| real renders | | | | {real['pixel_diversity']:.3f} "
                 f"| {real['feature_diversity']:.3f} | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, choices=list(SETTINGS))
    parser.add_argument("--encoder", nargs="*", default=ENCODER_DEFAULT, choices=list(SETTINGS),
                        help="settings an encoder is trained on (none: skip that part)")
    parser.add_argument("--k", type=int, default=4, help="images per caption group")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds after one warm-up (0: one timed round)")
    parser.add_argument("--pool-rounds", type=int, default=4,
                        help="calls (of 10 groups) stored for each encoder setting")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-steps", type=int, default=60, help="encoder steps per run")
    parser.add_argument("--jobs", type=int, default=1, help="encoder runs at once")
    parser.add_argument("--reuse-encoders", type=Path, default=None,
                        help="a sampler_table.json whose encoder results (same pool, steps and "
                             "seeds) stand for this run's (teacher settings: same images)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 settings, k=4, 1 round, 1-step encoders, 1 seed")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.settings, args.encoder = ["teacher_dpm2", "student_lcm1"], ["student_lcm1"]
        args.k, args.rounds, args.pool_rounds, args.seeds, args.train_steps = 4, 1, 2, [0], 2
    if "paper" not in args.settings and not args.quick:
        parser.error("--settings must include paper (the ratio's reference)")
    unknown = set(args.encoder) - set(args.settings)
    if unknown:
        parser.error(f"--encoder {sorted(unknown)} not among --settings")
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    classifier = load_classifier(SHIPPED_MODELS["toy"])
    producers = {name: make_producer(name, args.k) for name in tqdm(args.settings, desc="build")}
    groups: dict[str, list[CaptionGroup]] = {name: [] for name in args.settings}
    seconds: dict[str, list[float]] = {name: [] for name in args.settings}
    # Round 0 is the warm-up, untimed unless it is the only round (--rounds 0: eager CPU
    # producers have no compile to warm up).
    for round_index in tqdm(range(args.rounds + 1), desc="rounds"):
        for name, producer in producers.items():
            t0 = time.perf_counter()
            groups[name] += producer.next_groups()
            if round_index > 0 or args.rounds == 0:
                seconds[name].append(time.perf_counter() - t0)
    images_per_call = args.k * TOY_CATEGORIES
    reference = "paper" if "paper" in args.settings else args.settings[0]
    ref_speed = images_per_call / statistics.median(seconds[reference])
    rows = []
    for name in args.settings:
        speed = images_per_call / statistics.median(seconds[name])
        rows.append({"name": name, "overrides": SETTINGS[name], "images_per_s": speed,
                     "speedup_vs_paper": speed / ref_speed, "call_seconds": seconds[name],
                     **group_metrics(classifier, groups[name])})
        tqdm.write(json.dumps({k: v for k, v in rows[-1].items() if k != "overrides"}))
    result = {
        "benchmark": "sampler_table",
        "command": "python benchmarks/sampler_table.py " + " ".join(argv or sys.argv[1:]),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "real": real_metrics(classifier, args.k),
        "rows": rows,
    }
    reused = _reusable_encoders(args)
    _write(args.out, {**result, "wall_s": round(time.perf_counter() - t_start, 1)})
    with tempfile.TemporaryDirectory() as tmp:
        for row in rows:
            name = row["name"]
            if name in reused:
                row["encoder"] = reused[name]
            elif name in args.encoder:
                while len(groups[name]) < args.pool_rounds * TOY_CATEGORIES:
                    groups[name] += producers[name].next_groups()
                shards = Path(tmp) / name
                write_shards(groups[name][:args.pool_rounds * TOY_CATEGORIES], shards)
                with ThreadPoolExecutor(args.jobs) as pool:
                    n = len(args.seeds)
                    runs = list(pool.map(train_and_probe, [shards] * n, args.seeds,
                                         [args.train_steps] * n, [Path(tmp)] * n))
                row["encoder"] = {"pool_images": args.pool_rounds * TOY_CATEGORIES * args.k,
                                  "runs": runs, **{key: mean_ci([r[key] for r in runs])
                                                   for key in ("linear_top1", "knn_top1")}}
                tqdm.write(f"{name}: {row['encoder']}")
            # Written after every setting: a stopped run still leaves its finished rows.
            _write(args.out, {**result, "wall_s": round(time.perf_counter() - t_start, 1)})
    for producer in producers.values():
        producer.close()
    print(markdown(result))
    print(f"wrote {args.out / 'sampler_table.json'} and sampler_table.md")
    return 0


def _write(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sampler_table.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "sampler_table.md").write_text(markdown(result))


def _reusable_encoders(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Encoder results of --reuse-encoders' run for settings of --encoder, when that run used
    the same pool, steps and seeds: its stored images were then the same (the producer's noise
    is seeded), so training on them again would repeat the same runs."""
    if args.reuse_encoders is None:
        return {}
    old = json.loads(args.reuse_encoders.read_text())
    same = ("k", "pool_rounds", "seeds", "train_steps")
    if any(old["settings"][key] != getattr(args, key) for key in same):
        raise SystemExit(f"--reuse-encoders {args.reuse_encoders}: its {same} differ from this "
                         "run's")
    return {row["name"]: {**row["encoder"], "reused_from": str(args.reuse_encoders)}
            for row in old["rows"] if "encoder" in row and row["name"] in args.encoder}


if __name__ == "__main__":
    sys.exit(main())
