"""What writing generated groups to shards (shards.write_dir) costs, with and without it side
by side in one run, repetitions interleaved so load from other processes hits both alike.

1. Generation: the procedural producer alone, timed over a number of calls, plain vs wrapped by
   the shard-writing decorator (producers/shard_writing.py): images/s seen by the caller (the
   writer works in its background thread) and images/s until the last shard is complete (close included).
   At the preset's 40 px and at 256 px (the stored size of the paper), PNG and JPEG, rendering
   on the CPU as fast as it can, and paced like a GPU producer (its thread sleeps).
2. Training: the colocated procedural job (`online-stablerep train --config cpu_procedural`) in
   fresh processes with and without shards.write_dir: train/images_per_s and gen/images_per_s
   from its TensorBoard scalars (median over the logged steps after the first).

    python benchmarks/shard_writing.py                  # about 4 minutes on 2 shared cores
    python benchmarks/shard_writing.py --reps 1 --job-steps 20 --calls 4   # smoke
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS_DIR, write_results  # noqa: E402
from online_stablerep.shards.writer import WRITER_NICENESS  # noqa: E402

_256 = ["producer.output_size=256", "procedural.render_size=64"]
# Producer scenarios: name -> (overrides on the cpu_procedural preset, seconds the producer
# sleeps per image). A sleeping producer stands for a GPU one: its thread waits on the device
# and leaves the CPU to the writer; the others render on the CPU as fast as they can.
SCENARIOS = {
    "40px png, cpu-bound": (["shards.image_format=png"], 0.0),
    "256px png, cpu-bound": ([*_256, "shards.image_format=png"], 0.0),
    "256px jpg, cpu-bound": ([*_256, "shards.image_format=jpg", "shards.quality=95"], 0.0),
    "256px png, gpu-like 100 img/s": ([*_256, "shards.image_format=png"], 0.01),
}


class Paced:
    """A producer that also waits `seconds_per_image` per image made (a stand-in for a GPU)."""

    def __init__(self, inner, seconds_per_image: float) -> None:
        self.inner = inner
        self.seconds_per_image = seconds_per_image

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def next_groups(self):
        groups = self.inner.next_groups()
        time.sleep(self.seconds_per_image * sum(g.num_images for g in groups))
        return groups


def generation_rate(overrides: list[str], pace: float, write_dir: Path | None,
                    calls: int) -> dict[str, float]:
    """Images/s of `calls` producer calls (caller's view and until the shards are complete)."""
    from online_stablerep.config import load_config
    from online_stablerep.producers.procedural import ProceduralProducer
    from online_stablerep.producers.shard_writing import ShardWritingProducer
    from online_stablerep.shards.writer import ShardWriter

    cfg = load_config("cpu_procedural", [*overrides, "producer.captions_per_call=16"])
    producer = Paced(ProceduralProducer(cfg, 0, 1), pace)
    if write_dir is not None:
        x = cfg.shards
        producer = ShardWritingProducer(producer, ShardWriter(
            write_dir, 0, x.image_format, x.quality, x.groups_per_shard, x.queue_groups))
    producer.start()
    producer.next_groups()  # warm-up: first renders, first shard file
    images = 0
    start = time.perf_counter()
    for _ in range(calls):
        images += sum(g.num_images for g in producer.next_groups())
    made = time.perf_counter() - start
    producer.close()
    done = time.perf_counter() - start
    return {"images": images, "images_per_s": images / made, "images_per_s_closed": images / done}


def job_rates(writes: bool, steps: int, workdir: Path) -> dict[str, float]:
    """train/ and gen/images_per_s of a colocated procedural run, from its TensorBoard scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = Path(tempfile.mkdtemp(dir=workdir))
    args = [sys.executable, "-m", "online_stablerep.cli", "train", "--config", "cpu_procedural",
            f"output_dir={out}", f"train.steps={steps}", "train.log_every=5",
            "train.checkpoint_every=0", "train.image_grid_every=0", "eval.probe_at_end=false",
            "train.cpu_threads=1"]
    if writes:
        args.append(f"shards.write_dir={out / 'shards'}")
    subprocess.run(args, check=True, capture_output=True)
    acc = EventAccumulator(str(out / "tensorboard" / "train"))
    acc.Reload()
    rates = {}
    for tag in ("train/images_per_s", "gen/images_per_s"):
        values = [e.value for e in acc.Scalars(tag)][1:]
        rates[tag.replace("/", "_")] = statistics.median(values)
    if writes:
        from online_stablerep.shards.format import scan_keys

        rates["groups_written"] = sum(len(scan_keys(p)) for p in (out / "shards").glob("*.tar"))
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--calls", type=int, default=12, help="producer calls timed per rep")
    parser.add_argument("--job-steps", type=int, default=120, help="steps of each training run")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for index, (name, (overrides, pace)) in enumerate(SCENARIOS.items()):
            for rep in range(args.reps):
                for writes in (False, True):
                    folder = work / f"gen{index}-{rep}" if writes else None
                    rate = generation_rate(overrides, pace, folder, args.calls)
                    rows.append({"part": "generation", "scenario": name, "writes": writes,
                                 "rep": rep, **rate})
                    print(rows[-1], flush=True)
        for rep in range(args.reps):
            for writes in (False, True):
                rows.append({"part": "training", "scenario": "cpu_procedural job", "writes": writes,
                             "rep": rep, **job_rates(writes, args.job_steps, work)})
                print(rows[-1], flush=True)
    summary = {}
    fields = {"generation": ("images_per_s", "images_per_s_closed"),
              "training": ("train_images_per_s", "gen_images_per_s")}
    for part, names in fields.items():
        for scenario in dict.fromkeys(r["scenario"] for r in rows if r["part"] == part):
            for field in names:
                med = {writes: statistics.median(
                    r[field] for r in rows
                    if r["part"] == part and r["scenario"] == scenario and r["writes"] == writes)
                    for writes in (False, True)}
                summary[f"{scenario} {field}"] = {"without": med[False], "with": med[True],
                                                  "ratio": med[True] / med[False]}
    settings = {"reps": args.reps, "calls": args.calls, "job_steps": args.job_steps,
                "scenarios": SCENARIOS, "captions_per_call": 16,
                "writer_niceness": WRITER_NICENESS}
    paths = write_results("shard_writing", torch.device("cpu"), settings, summary, rows, args.out)
    for key, value in summary.items():
        print(f"{key}: without {value['without']:.1f}, with {value['with']:.1f} "
              f"(x{value['ratio']:.3f})")
    print(f"wrote {paths['json']} and {paths['csv']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
