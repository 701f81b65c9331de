"""Fresh generated images against a fixed generated set, at equal trainer steps and equal budget,
with the toy text-to-image model on the CPU (docs/evidence.md).

    python benchmarks/online_vs_fixed.py [--out DIR] [--quick] [--jobs 2] [--deadline-min 70]

Every arm trains the cpu_demo backbone (resnet10t at 32 px, n x k = 8 x 4, colocated in one
process through `online-stablerep train`) for the same number of steps on the captions of the toy
model's world (`captions.path=toy`: its 10 shapes; `--corpus toy_colours`: the 80 captions with
colour words), then probes it on the `procedural100` transfer suite (docs/evaluation.md). Arms:

- online_r1 / online_r3 / online_r9: images generated during training, each group (k = 4
  images) used at most 1, 3 or 9 times (`replay.max_reuse`);
- fixed_equal: the paper's regime. A fixed set of m = 10 images per caption group is made once
  through `shards.write_dir`, with as many images as online_r9 generates, and trained back with
  `producer.kind=shards` (each group once per pass over the set, every image used ~9 times);
- fixed_small: the first third of that set (each image used ~27 times);
- simclr_fixed: the fixed_equal images with `batch.positives=image` (SimCLR's positives: k
  augmentations of one image);
- simclr_real / multipos_real: real renders of the toy model's 10 categories (procedural
  producer), SimCLR positives or k renders of a category as positives;
- online_r1_budget_paper / online_r1_budget_fast: fresh images for as few steps as cost what
  fixed_equal costs (generation + training) under the FLOP model with the `paper` recipe and
  with the fastest recipe (`turbo`).

The online arms read back the stream the toy model generated for online_r1 (the same groups in
the same order, so each reuse level does not generate its images again); images generated are
counted as the groups each arm consumed from it. Costs are those of the paper's scale, from planning/flops.py: a toy image is charged as one SD1.5
image at 512 px (paper recipe or turbo), a toy view as one ViT-B/16 view at 224 px, converted to
H100-seconds at the FLOP model's assumed utilisations. Results go to DIR/online_vs_fixed.json,
.csv and .png after every finished run, so a cut run still leaves a table; generated shards, run
folders and the suite's image cache go to --work.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import RESULTS_DIR, _figure
from online_stablerep.config import load_config
from online_stablerep.planning import flops

ROOT = Path(__file__).resolve().parents[1]
N, K = 8, 4  # captions x views per batch (cpu_demo's)
VIEWS_PER_STEP = N * K
M = 10  # images per caption group of the fixed set (the paper's)
FIXED_REUSE, SMALL_REUSE = 9, 27  # target uses per stored image (paper: ~9)
SUITE = "procedural100"
# Warm-up as a fraction of the steps (cpu_demo: 50 of 600), so short budget arms warm up alike.
WARMUP_FRACTION = 50 / 600
# Student t quantiles (0.975) for 1..9 degrees of freedom: the 95% CI of a mean over seeds.
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262]
METRICS = ("linear_top1", "knn_top1", "fewshot_5way_1shot", "fewshot_5way_5shot")

COMMON = [
    "roles.generators=0", "train.cpu_threads=1", "train.checkpoint_every=0",
    "train.image_grid_every=0", "train.log_every=50", "train.audit=true",
    f"batch.captions_per_batch={N}", f"batch.views_per_caption={K}",
    "eval.probe_at_end=true", f"eval.suite={SUITE}", "eval.baselines=false",
    # Generation (the sets) and shards reading: one call makes or reads a batch's captions.
    f"producer.captions_per_call={N}",
    # 2 DPM-Solver++ steps: half the cost of cpu_demo's 4, same alignment and probe
    # (docs/toy-model.md, experiments); the toy's cost is not what the accounting charges.
    "generator.steps=2",
]


@dataclass(frozen=True)
class Arm:
    name: str
    # "online" (toy model in the loop), "fixed" (stored set), "real" (procedural renders).
    source: str
    max_reuse: int = 1
    positives: str = "caption"
    # Stored set of a fixed arm: "equal" (online_r9's images) or "small" (its first third).
    fixed_set: str = ""
    # Budget arms: the recipe whose cost sets the steps ("" = the common steps).
    budget_recipe: str = ""


ARMS = [
    Arm("online_r1", "online", 1),
    Arm("online_r3", "online", 3),
    Arm("online_r9", "online", 9),
    Arm("fixed_equal", "fixed", fixed_set="equal"),
    Arm("fixed_small", "fixed", fixed_set="small"),
    Arm("simclr_fixed", "fixed", positives="image", fixed_set="equal"),
    Arm("simclr_real", "real", positives="image"),
    Arm("multipos_real", "real"),
    Arm("online_r1_budget_paper", "online", 1, budget_recipe="paper"),
    Arm("online_r1_budget_fast", "online", 1, budget_recipe="turbo"),
]


def t95(values: list[float]) -> float:
    """Half-width of the 95% confidence interval of the mean (Student t; 0 for one value)."""
    if len(values) < 2:
        return 0.0
    t = T975[len(values) - 2] if len(values) - 2 < len(T975) else 1.96
    return t * statistics.stdev(values) / math.sqrt(len(values))


def cost_model() -> dict[str, float]:
    """FLOPs of one ViT-B/16 training view and of one SD1.5 image per recipe, and H100-seconds
    of each at the FLOP model's assumed utilisations."""
    base = load_config("sd15_vitb16")
    view = flops.train_flops_per_view(base)
    peak = flops.peak_flops("h100")
    out = {"view_flops": view, "view_h100_s": view / (peak * flops.TRAINING_UTILISATION)}
    for recipe in ("paper", "turbo"):
        image = flops.generator_flops_per_image(load_config("sd15_vitb16",
                                                            [f"generator.recipe={recipe}"]))
        out[f"image_flops_{recipe}"] = image
        out[f"image_views_{recipe}"] = image / view
        out[f"image_h100_s_{recipe}"] = image / (peak * flops.GENERATION_UTILISATION)
    return out


def fixed_groups(steps: int, reuse: int) -> int:
    """Groups of m images whose images are each used `reuse` times in `steps` steps: a whole
    number of batches' worth of captions, at least one batch."""
    return max(N, round(steps * VIEWS_PER_STEP / (reuse * M) / N) * N)


def generate_groups(seed: int, groups: int, images_per_group: int, out: Path,
                    groups_per_shard: int, corpus: str) -> float:
    """Make `groups` caption groups with the toy model into shards at `out`, through
    shards.write_dir (the real shard-writing path: ShardWritingProducer and ShardWriter). Returns seconds."""
    from online_stablerep.producers import build_producer

    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config("cpu_demo", [
        *COMMON, f"captions.path={corpus}", f"producer.seed={seed}",
        f"producer.images_per_caption={images_per_group}",
        f"shards.write_dir={out}", f"shards.groups_per_shard={groups_per_shard}",
    ])
    start = time.perf_counter()
    producer = build_producer(cfg, shard=0, num_shards=1, device="cpu")
    producer.start()
    made = 0
    try:
        while made < groups:
            made += len(producer.next_groups())
    finally:
        producer.close()
    return time.perf_counter() - start


def make_sets(seed: int, steps: int, equal: int, small: int, out: Path, corpus: str) -> dict:
    """One seed's generated images: the online stream (groups of k in generation order, enough
    for every step of online_r1) and the fixed set (`equal` groups of m; its first `small`
    groups copied to out/small). A complete earlier set of the same sizes is reused."""
    stream_groups = steps * N + 8 * N  # one group per caption and step, plus read-ahead
    done = out / "sets.json"
    if done.is_file():
        info = json.loads(done.read_text())
        if (info["stream_groups"], info["equal_groups"], info["small_groups"],
                info.get("corpus")) == (stream_groups, equal, small, corpus):
            return info
    stream_s = generate_groups(seed, stream_groups, K, out / "stream", 1000, corpus)
    fixed_s = generate_groups(seed, equal, M, out / "equal", N, corpus)
    small_dir = out / "small"
    shutil.rmtree(small_dir, ignore_errors=True)
    small_dir.mkdir(parents=True)
    for path in sorted((out / "equal").glob("*.tar"))[: small // N]:
        shutil.copy(path, small_dir / path.name)
    info = {"seed": seed, "corpus": corpus, "stream_groups": stream_groups, "stream_s": round(stream_s, 1),
            "images_per_s": round(stream_groups * K / stream_s, 2), "equal_groups": equal,
            "images": equal * M, "small_groups": small, "fixed_s": round(fixed_s, 1)}
    done.write_text(json.dumps(info))  # last: a set without it is made again
    return info


def arm_overrides(arm: Arm, seed: int, steps: int, sets: Path, corpus: str) -> list[str]:
    warmup = max(1, round(steps * WARMUP_FRACTION))
    common = [*COMMON, f"captions.path={corpus}", f"seed={seed}", f"train.steps={steps}", f"optim.warmup_steps={warmup}",
              f"batch.positives={arm.positives}"]
    seed_sets = sets / f"seed{seed}"
    if arm.source == "online":
        # The generator's stream read back in generation order, once (train.epochs=1): the
        # groups, their order and the draws are what generating in the loop gives, without
        # generating the same images again for every reuse level.
        return [*common, "producer.kind=shards", f"shards.path={seed_sets / 'stream'}",
                "shards.shuffle_files=false", "train.epochs=1",
                f"replay.max_reuse={arm.max_reuse}"]
    if arm.source == "fixed":
        # Each group once per pass over the set; a pool of 4n mixes batches across files.
        return [*common, "producer.kind=shards", f"shards.path={seed_sets / arm.fixed_set}",
                "replay.max_reuse=1", f"replay.min_pool={4 * N}"]
    # Real renders of the toy world's categories: producer.seed 0 defines them (cpu_demo).
    images = 1 if arm.positives == "image" else K
    return [*common, "producer.kind=procedural", "producer.seed=0",
            f"producer.images_per_caption={images}", "replay.max_reuse=1"]


def run_arm(arm: Arm, seed: int, steps: int, work: Path, sets: dict, quick: bool,
            timeout_s: float, corpus: str) -> dict:
    """Train and probe one arm for one seed in a fresh process (in work/runs); its row."""
    run_dir = work / "runs" / f"{arm.name}-s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"output_dir={run_dir}", f"eval.cache_dir={work / 'cache'}",
                 *arm_overrides(arm, seed, steps, work / "sets", corpus)]
    if quick:
        overrides.append("eval.epochs=5")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "online_stablerep.cli", "train", "--config", "cpu_demo",
           *overrides]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"{arm.name} seed {seed} failed:\n{done.stdout[-1500:]}"
                           f"{done.stderr[-3000:]}")
    probe = json.loads((run_dir / "probe.json").read_text())
    audit = json.loads((run_dir / "audit" / "trainer_rank0.json").read_text())
    summary = json.loads((run_dir / "train_summary.json").read_text())
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    counters = audit["counters"]
    if arm.source == "online":
        generated = counters["groups_added"] * K
    elif arm.source == "fixed":
        generated = sets[seed]["images"] if arm.fixed_set == "equal" else \
            sets[seed]["small_groups"] * M
    else:
        generated = 0
    views = summary["steps"] * VIEWS_PER_STEP
    return {
        "arm": arm.name, "source": arm.source, "positives": arm.positives,
        "max_reuse": arm.max_reuse, "seed": seed, "steps": summary["steps"],
        "images_generated": generated,
        "real_images": counters["images_added"] if arm.source == "real" else 0,
        "views_trained": views,
        "uses_per_generated_image": round(views / generated, 2) if generated else None,
        **{key: probe.get(key) for key in METRICS},
        "fewshot_5way_5shot_ci95": probe.get("fewshot_5way_5shot_ci95"),
        "last_loss": summary["last_loss"],
        "wall_s": round(time.perf_counter() - start, 1),
    }


def add_costs(row: dict, cost: dict) -> dict:
    for recipe, label in (("paper", "paper"), ("turbo", "fast")):
        gen_s = row["images_generated"] * cost[f"image_h100_s_{recipe}"]
        train_s = row["views_trained"] * cost["view_h100_s"]
        row[f"cost_{label}_h100_s"] = round(gen_s + train_s, 3)
        row[f"gen_share_{label}"] = round(gen_s / (gen_s + train_s), 3)
    return row


def budget_steps(recipe: str, steps: int, equal_images: int, cost: dict) -> int:
    """Steps of fresh images (one image per view) that cost what fixed_equal costs."""
    image, view = cost[f"image_h100_s_{recipe}"], cost["view_h100_s"]
    fixed = equal_images * image + steps * VIEWS_PER_STEP * view
    return max(2, math.floor(fixed / (VIEWS_PER_STEP * (image + view))))


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and 95% CI over seeds of every arm's metrics and costs, in ARMS order."""
    table = []
    for arm in ARMS:
        part = [r for r in rows if r["arm"] == arm.name]
        if not part:
            continue
        entry = {"arm": arm.name, "seeds": len(part)}
        for key in (*METRICS, "steps", "images_generated", "views_trained",
                    "cost_paper_h100_s", "cost_fast_h100_s"):
            values = [float(r[key]) for r in part if r.get(key) is not None]
            if values:
                entry[key] = round(statistics.fmean(values), 4)
                entry[key + "_ci95"] = round(t95(values), 4)
        entry["per_seed_linear_top1"] = [round(r["linear_top1"], 4) for r in part]
        table.append(entry)
    return table


def plot(table: list[dict], path: Path) -> None:
    plt = _figure()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    panels = (("images_generated", "images generated (toy model)", "symlog"),
              ("steps", "trainer steps", "linear"),
              ("cost_paper_h100_s", "total cost, paper recipe (H100-s at paper scale)", "log"))
    for ax, (key, label, scale) in zip(axes, panels, strict=True):
        for entry in table:
            ax.errorbar(entry[key], entry["linear_top1"], yerr=entry.get("linear_top1_ci95", 0),
                        fmt="o", capsize=3, label=entry["arm"])
            ax.annotate(entry["arm"], (entry[key], entry["linear_top1"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        if scale == "symlog":
            ax.set_xscale("symlog", linthresh=100)
        elif scale == "log":
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"{SUITE} linear top-1 (mean, 95% CI)")
        ax.grid(alpha=0.3)
    fig.suptitle("fresh vs fixed generated images (toy model, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(document: dict) -> str:
    """The summary table of a results document, as docs/evidence.md shows it."""
    def cell(entry: dict, key: str, digits: int = 3) -> str:
        if key not in entry:
            return ""
        ci = entry.get(key + "_ci95", 0.0)
        return f"{entry[key]:.{digits}f} ± {ci:.{digits}f}" if entry["seeds"] > 1 else \
            f"{entry[key]:.{digits}f}"

    lines = ["| arm | seeds | steps | images generated | views / image | linear top-1 | "
             "k-NN top-1 | 5-way 1-shot | 5-way 5-shot | cost, paper recipe (H100-s) | "
             "cost, fastest recipe (H100-s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for entry in document["table"]:
        images = entry["images_generated"]
        uses = f"{entry['views_trained'] / images:.1f}" if images else "real"
        lines.append(
            f"| {entry['arm']} | {entry['seeds']} | {entry['steps']:.0f} | {images:.0f} | {uses} | "
            + " | ".join(cell(entry, key) for key in METRICS)
            + f" | {entry['cost_paper_h100_s']:.1f} | {entry['cost_fast_h100_s']:.2f} |")
    return "\n".join(lines)


def write(out: Path, settings: dict, cost: dict, sets: dict, rows: list[dict],
          failures: list[str]) -> None:
    table = summarise(rows)
    document = {"benchmark": "online_vs_fixed", "settings": settings, "cost_model": cost,
                "fixed_sets": list(sets.values()), "table": table, "rows": rows,
                "failures": failures}
    tmp = out / "online_vs_fixed.json.tmp"
    tmp.write_text(json.dumps(document, indent=1) + "\n")
    tmp.replace(out / "online_vs_fixed.json")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = [",".join(columns)] + [",".join("" if r.get(c) is None else str(r[c])
                                            for c in columns) for r in rows]
    (out / "online_vs_fixed.csv").write_text("\n".join(lines) + "\n")
    if table:
        plot(table, out / "online_vs_fixed.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR,
                        help="where online_vs_fixed.json, .csv and .png go")
    parser.add_argument("--work", type=Path, default=Path("/tmp/online_vs_fixed"),
                        help="generated shards, run folders and the suite cache (reusable)")
    parser.add_argument("--quick", action="store_true",
                        help="every arm for a few steps, one seed, a short probe (a smoke run)")
    parser.add_argument("--steps", type=int, default=270, help="trainer steps of every arm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=[a.name for a in ARMS],
                        choices=[a.name for a in ARMS])
    parser.add_argument("--table", type=Path, default=None, metavar="JSON",
                        help="print the markdown table of an existing results file and exit")
    parser.add_argument("--corpus", default="toy", choices=["toy", "toy_colours"],
                        help="captions of the generated arms (docs/evidence.md: why toy)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows of --out's results file made with the same steps "
                             "(and corpus, for generated arms) and run only the rest")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (one thread each)")
    parser.add_argument("--deadline-min", type=float, default=0.0,
                        help="start no run after this many minutes (0 = none)")
    parser.add_argument("--run-timeout-min", type=float, default=40.0,
                        help="a run taking longer than this fails")
    args = parser.parse_args(argv)
    if args.table is not None:
        print(markdown_table(json.loads(args.table.read_text())))
        return 0
    if args.quick:
        args.steps, args.seeds = 12, args.seeds[:1]
    torch.set_num_threads(1)
    begin = time.monotonic()
    out, work = args.out, args.work
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings.update(n=N, k=K, m=M, suite=SUITE,
                    command="python benchmarks/online_vs_fixed.py " + " ".join(argv or sys.argv[1:]))
    cost = cost_model()
    arms = [a for a in ARMS if a.name in args.arms]
    equal = fixed_groups(args.steps, FIXED_REUSE)
    small = fixed_groups(args.steps, SMALL_REUSE)
    # 1. The generated images, per seed (each seed's arms see their own).
    sets: dict[int, dict] = {}
    ready = {seed: threading.Event() for seed in args.seeds}
    failures: list[str] = []

    def generate() -> None:
        # A thread of its own, seed by seed, while runs that need no sets (real renders) or
        # an earlier seed's sets go on beside it.
        for seed in args.seeds:
            try:
                sets[seed] = make_sets(seed, args.steps, equal, small,
                                       work / "sets" / f"seed{seed}", args.corpus)
                print(f"generated seed {seed}: {sets[seed]}", flush=True)
            except Exception as err:  # noqa: BLE001 - reported with the results, runs go on
                failures.append(f"generating seed {seed}: {err!r}")
            finally:
                ready[seed].set()

    # 2. The runs: real-render arms of every seed first (they need no generated images, so they
    # fill the wait for the first seed's), then seed-major (a cut run holds every arm for the
    # first seeds).
    steps_of = {a.name: (budget_steps(a.budget_recipe, args.steps, equal * M, cost)
                         if a.budget_recipe else args.steps) for a in arms}
    settings["steps_per_arm"] = steps_of
    tasks = [(arm, seed) for seed in args.seeds for arm in arms if arm.source == "real"]
    tasks += [(arm, seed) for seed in args.seeds for arm in arms if arm.source != "real"]
    rows: list[dict] = []
    previous = out / "online_vs_fixed.json"
    if args.resume and previous.is_file():
        # Real-render arms do not read the corpus: their rows stay valid across corpora.
        document = json.loads(previous.read_text())
        same = document["settings"]["steps"] == args.steps
        rows = [r for r in document["rows"] if same and r["arm"] in steps_of and (
            r["source"] == "real" or document["settings"].get("corpus") == args.corpus)]
        done = {(r["arm"], r["seed"]) for r in rows}
        tasks = [(arm, seed) for arm, seed in tasks if (arm.name, seed) not in done]
        print(f"resuming: {len(rows)} rows kept, {len(tasks)} runs to go", flush=True)
    lock = threading.Lock()

    def run_task(arm: Arm, seed: int) -> None:
        if arm.source != "real":
            ready[seed].wait()
            if seed not in sets:
                with lock:
                    failures.append(f"{arm.name} seed {seed}: not run (no generated images)")
                return
        if args.deadline_min and time.monotonic() - begin > args.deadline_min * 60:
            with lock:
                failures.append(f"{arm.name} seed {seed}: not started (deadline)")
            return
        try:
            row = add_costs(run_arm(arm, seed, steps_of[arm.name], work, sets, args.quick,
                                    args.run_timeout_min * 60, args.corpus), cost)
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            with lock:
                failures.append(str(err)[-2000:])
                write(out, settings, cost, sets, rows, failures)
            print(f"FAILED {arm.name} seed {seed}: {str(err)[-500:]}", flush=True)
            return
        with lock:
            rows.append(row)
            write(out, settings, cost, sets, rows, failures)
        print(json.dumps({k: row[k] for k in ("arm", "seed", "steps", "images_generated",
                                              "linear_top1", "wall_s")}), flush=True)

    if any(a.source != "real" for a in arms):
        threading.Thread(target=generate, daemon=True).start()
    else:
        for event in ready.values():
            event.set()
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in [pool.submit(run_task, arm, seed) for arm, seed in tasks]:
            future.result()
    write(out, settings, cost, sets, rows, failures)
    print(f"wrote {out / 'online_vs_fixed.json'} (.csv, .png): {len(rows)} runs, "
          f"{len(failures)} failed or not started", flush=True)
    return 1 if failures and not rows else 0


if __name__ == "__main__":
    sys.exit(main())
