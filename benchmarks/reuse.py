"""What reuse costs: probe quality at equal training steps for replay.max_reuse R in
{1, 3, 9, 27} (R times fewer images generated), with the random draws and the old sequential
ones, and k in {2, 4} views per caption at equal images seen; each over several seeds.

Runs the colocated procedural job (`online-stablerep train --config cpu_procedural`) once per
configuration, each in a fresh process, and reads its train_summary.json, probe.json and audit
(images generated = groups the buffer received x images per caption). Writes
benchmarks/results/reuse-<machine>.json/.csv and a plot.

    python benchmarks/reuse.py                    # the full grid (16 runs)
    python benchmarks/reuse.py --steps 20 --reuse 1 3 --seeds 0 --draws random --ks 4  # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS_DIR, machine_name, plot_lines, write_results  # noqa: E402

# Images per step stay at n x k = 32 in every configuration (the k runs trade captions for
# views): half the preset's 16 x 4, to fit the grid on 2 shared cores.
IMAGES_PER_STEP = 32


@dataclass(frozen=True)
class Scenario:
    max_reuse: int
    draw: str
    k: int
    seed: int

    @property
    def n(self) -> int:
        return IMAGES_PER_STEP // self.k

    def overrides(self, steps: int, out: Path) -> list[str]:
        return [
            f"output_dir={out}", f"seed={self.seed}", f"train.steps={steps}",
            f"replay.max_reuse={self.max_reuse}", f"replay.draw={self.draw}",
            f"batch.captions_per_batch={self.n}", f"batch.views_per_caption={self.k}",
            f"producer.images_per_caption={self.k}",
            # Room for the largest pool (4n) plus one producer call, so nothing is evicted.
            f"replay.capacity={max(256, 4 * self.n + 64)}",
            "train.audit=true", "train.checkpoint_every=0", "train.image_grid_every=0",
            "train.log_every=100", "eval.baselines=false", "train.cpu_threads=1",
        ]


def run_one(scenario: Scenario, steps: int, workdir: Path) -> dict:
    out = workdir / f"r{scenario.max_reuse}-{scenario.draw}-k{scenario.k}-s{scenario.seed}"
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "online_stablerep.cli", "train", "--config", "cpu_procedural",
         *scenario.overrides(steps, out)],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{scenario} failed:\n{result.stderr[-3000:]}")
    probe = json.loads((out / "probe.json").read_text())
    audit = json.loads((out / "audit" / "trainer_rank0.json").read_text())
    summary = json.loads((out / "train_summary.json").read_text())
    return {
        **asdict(scenario),
        "n": scenario.n,
        "steps": summary["steps"],
        "images_generated": audit["counters"]["groups_added"] * scenario.k,
        "images_seen": summary["steps"] * IMAGES_PER_STEP,
        "linear_top1": probe["linear_top1"],
        "knn_top1": probe["knn_top1"],
        "linear_top1_random_init": probe.get("linear_top1_random_init"),
        "batch_overlap": audit["batch_overlap"],
        "use_spread_steps": audit["use_spread_steps"],
        "last_loss": summary["last_loss"],
        "wall_s": round(time.perf_counter() - start, 1),
    }


def _mean(rows: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in rows)


def summarise(rows: list[dict]) -> dict:
    """Mean probe top-1 and k-NN over seeds for every (R, draw, k)."""
    cells: dict[str, list[dict]] = {}
    for row in rows:
        cells.setdefault(f"R={row['max_reuse']} {row['draw']} k={row['k']}", []).append(row)
    return {
        name: {"linear_top1": round(_mean(group, "linear_top1"), 4),
               "knn_top1": round(_mean(group, "knn_top1"), 4),
               "images_generated": round(_mean(group, "images_generated")),
               "batch_overlap": round(_mean(group, "batch_overlap"), 3),
               "seeds": len(group)}
        for name, group in cells.items()
    }


def plot(rows: list[dict], reuse: list[int], draws: list[str], path: Path) -> None:
    series, spread = {}, {}
    for draw in draws:
        for metric in ("linear_top1", "knn_top1"):
            values, bands = [], []
            for r in reuse:
                scores = [row[metric] for row in rows
                          if row["max_reuse"] == r and row["draw"] == draw and row["k"] == 4]
                values.append(statistics.fmean(scores) if scores else float("nan"))
                bands.append((min(scores), max(scores)) if scores else (float("nan"),) * 2)
            series[f"{metric} ({draw})"] = values
            spread[f"{metric} ({draw})"] = bands
    plot_lines(path, "Probe top-1 at equal steps vs max_reuse (k=4, seed range)",
               "max_reuse R (R x fewer images generated)", "top-1 on real renders",
               [float(r) for r in reuse], series, spread)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--reuse", type=int, nargs="+", default=[1, 3, 9, 27])
    parser.add_argument("--draws", nargs="+", default=["random", "sequential"])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--k-reuse", type=int, default=3, help="max_reuse of the k runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()

    # Seed-major, so a cut-short run still holds every configuration once. At R = 1 no group
    # repeats and both rules draw every group once: one rule is enough.
    scenarios = []
    for seed in args.seeds:
        scenarios += [Scenario(r, d, 4, seed) for r in args.reuse for d in args.draws
                      if r > 1 or d == args.draws[0]]
        scenarios += [Scenario(args.k_reuse, "random", k, seed) for k in args.ks
                      if Scenario(args.k_reuse, "random", k, seed) not in scenarios]
    device = torch.device("cpu")
    settings = {"preset": "cpu_procedural", "steps": args.steps,
                "images_per_step": IMAGES_PER_STEP, "k_reuse": args.k_reuse,
                "command": " ".join(["python", "benchmarks/reuse.py", *sys.argv[1:]])}
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for index, scenario in enumerate(scenarios, 1):
            row = run_one(scenario, args.steps, Path(workdir))
            rows.append(row)
            print(f"[{index}/{len(scenarios)}] {json.dumps(row)}", flush=True)
            # Written after every run: an interrupted grid keeps what it measured.
            settings["runs_done"] = f"{index}/{len(scenarios)}"
            paths = write_results("reuse", device, settings, summarise(rows), rows, args.out_dir)
            plot(rows, args.reuse, args.draws, args.out_dir / f"reuse-{machine_name(device)}.png")
    print(f"wrote {paths['json']}")


if __name__ == "__main__":
    main()
