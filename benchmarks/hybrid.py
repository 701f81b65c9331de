"""The hybrid job at several generator:trainer splits, and what its queue costs a generator.

    python benchmarks/hybrid.py                 # CPU: 2 cores, every rank pinned to one core
    python benchmarks/hybrid.py --device cuda   # one GPU shared by 1 trainer + 1 generator

1. Queue cost. For each producer (diffusion: `cpu_demo`, tiny architecture; procedural), the
   generator's images/s in the real job (1 trainer + 1 generator, each pinned to its own core)
   against a standalone loop over `producer.next_groups()` at the same settings, pinned to the
   generator's core with the same torch threads (1). The standalone side runs just before and
   just after the job (the machine may be shared), and `hybrid_over_standalone` compares the job
   with their mean.
2. Splits. The job at other trainer:generator splits (ranks pinned round-robin to the cores):
   generator images/s, trainer images/s, trainer idle fraction and mean reuse.

Each job runs `python -m online_stablerep.cli train` on one process per rank, exactly as the
tests start it, for a fixed time after its first step; then its trainers get SIGTERM (the job's
own stop path). Figures come from the trainer's TensorBoard scalars. Only the steady part counts:
the first `warmup_s` seconds after the first step (or after the standalone loop's start) are
skipped, and rates run between two arrivals of generated groups, so no partial producer call is
counted. Spread: the rate over consecutive `chunk_s` windows (median and quartiles).
Writes benchmarks/results/hybrid-<machine>.{json,csv,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.common import (
    Timing,
    add_common_arguments,
    machine_name,
    plot_bars,
    resolve_device,
    write_results,
)
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
# Runs a module with this process (and every thread it starts) pinned to one core.
PIN = ("import os, runpy, sys; os.sched_setaffinity(0, {int(sys.argv[1])}); "
       "sys.argv = sys.argv[2:]; runpy.run_module(sys.argv[0], run_name='__main__', "
       "alter_sys=True)")
# Job overrides of every run: log every step, no checkpoints, images or probe, stop by signal.
JOB = ["train.steps=1000000", "train.log_every=1", "train.checkpoint_every=0",
       "train.image_grid_every=0", "eval.probe_at_end=false", "transport.timeout_s=60"]
PRODUCERS = {
    "cpu": {
        # Speed work stays on the tiny random-weight architecture (cpu_demo runs the toy model).
        "diffusion": ("cpu_demo", ["generator.model=tiny", "captions.path=demo"]),
        # Dense fractals make generation cost far more than training on a group, so the
        # trainer keeps up; credit for 4 calls lets a call go out while the next is made.
        "procedural": ("cpu_procedural", [
            "procedural.num_points=96000", "producer.captions_per_call=16",
            "transport.credits_per_generator=64", "replay.max_reuse=1",
            "model.head_hidden_dim=64", "model.embed_dim=32", "batch.captions_per_batch=16",
            "batch.views_per_caption=2"]),
    },
    "cuda": {
        "diffusion": ("sd15_vitb16", [
            "producer.images_per_caption=4", "producer.captions_per_call=4",
            "model.backbone=vit_small_patch16_224", "batch.captions_per_batch=16",
            "batch.views_per_caption=2", "replay.capacity=256", "replay.max_reuse=4"]),
    },
}
SETTINGS = {
    "cpu": {"standalone_s": 18.0, "hybrid_s": 36.0, "split_s": 26.0, "warmup_s": 8.0,
            "chunk_s": 6.0, "pin": True, "standalone_after": True,
            "splits": [(1, 2), (2, 1)], "split_producer": "procedural"},
    "cuda": {"standalone_s": 30.0, "hybrid_s": 45.0, "split_s": 0.0, "warmup_s": 10.0,
             "chunk_s": 8.0, "pin": False, "standalone_after": False,
             "splits": [], "split_producer": "diffusion"},
}
STARTUP_TIMEOUT_S = 240.0


def command(module: str, args: list[str], core: int | None) -> list[str]:
    """`python -m module args`, pinned to `core` when one is given."""
    if core is None:
        return [sys.executable, "-m", module, *args]
    return [sys.executable, "-c", PIN, str(core), module, *args]


@dataclass
class Steady:
    """The steady part of a cumulative (t, count) trace: between its first and last increase
    after the warm-up, so whole producer calls are counted."""

    rate: float  # count per second
    chunks: list[float]  # the rate over consecutive windows of at least chunk_s
    t0: float
    t1: float


def steady_rate(trace: list[tuple[float, float]], warmup_s: float, chunk_s: float) -> Steady:
    """The steady rate of a cumulative trace, skipping its first `warmup_s` seconds.

    Raises:
        ValueError: when fewer than two increases follow the warm-up (the run was too short).
    """
    rises = [(t, c) for (t, c), (_, before) in zip(trace[1:], trace, strict=False)
             if c > before and t >= warmup_s]
    if len(rises) < 2:
        raise ValueError(f"fewer than two arrivals after the {warmup_s:g} s warm-up: "
                         "make the run longer")
    (t0, c0), (t1, c1) = rises[0], rises[-1]
    chunks, start = [], rises[0]
    for t, c in rises[1:]:
        if t - start[0] >= chunk_s:
            chunks.append((c - start[1]) / (t - start[0]))
            start = (t, c)
    rate = (c1 - c0) / (t1 - t0)
    return Steady(rate, chunks or [rate], t0, t1)


def spread(values: list[float], prefix: str) -> dict[str, float]:
    """Median, quartiles, min, max of chunk rates as result-row fields."""
    fields = Timing(values).fields(prefix)
    fields[f"{prefix}_chunks"] = fields.pop("repetitions")
    return fields


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_used(samples: list[tuple[float, float]], t0: float, t1: float) -> float:
    """CPU seconds between t0 and t1, interpolated from (t, cpu seconds) samples."""
    times, cpu = [t for t, _ in samples], [c for _, c in samples]
    return float(np.interp(t1, times, cpu) - np.interp(t0, times, cpu))


# ---- the standalone producer ------------------------------------------------------------------


def standalone_main(argv: list[str]) -> int:
    """Worker: loop over producer.next_groups() for --seconds; write the trace of
    (t, images, CPU seconds of this process) after every call."""
    parser = argparse.ArgumentParser(description="standalone producer loop")
    parser.add_argument("--trace", type=Path, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from online_stablerep.config import load_config
    from online_stablerep.producers import build_producer

    cfg = load_config(args.config, args.overrides)
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(cfg.train.cpu_threads or 1)
    # Rank 1, shard 0 of 1: exactly the stream the job's only generator rank makes.
    producer = build_producer(cfg, 0, 1, rank=1, device=device)
    producer.start()
    trace, images = [(0.0, 0, time.process_time())], 0
    start = time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        images += sum(g.num_images for g in producer.next_groups())
        trace.append((time.perf_counter() - start, images, time.process_time()))
    producer.close()
    args.trace.write_text(json.dumps(trace))
    return 0


def run_standalone(config: str, overrides: list[str], seconds: float, core: int | None,
                   device: torch.device, work: Path) -> list[tuple[float, float, float]]:
    """The standalone worker's (t, images, CPU seconds) trace, run in its own process."""
    trace = work / f"standalone-{time.monotonic_ns()}.json"
    args = ["standalone", "--trace", str(trace), "--seconds", str(seconds), "--device",
            device.type, config, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if device.type == "cpu" else None
    done = subprocess.run(command("benchmarks.hybrid", args, core), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=seconds + STARTUP_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"standalone producer failed:\n{done.stderr[-3000:]}")
    return [tuple(point) for point in json.loads(trace.read_text())]


# ---- the job ----------------------------------------------------------------------------------


def _scalars(log_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """Every scalar tag of the trainer's TensorBoard events: [(wall time, value)] by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.wall_time, e.value) for e in sorted(acc.Scalars(tag), key=lambda e: e.step)]
            for tag in acc.Tags()["scalars"]}


def _cumulative(events: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Per-window rates (each window ends at its event, starts at the previous one) as a
    cumulative (seconds since the first event, count) trace."""
    t0 = events[0][0]
    trace, total = [(0.0, 0.0)], 0.0
    for (before, _), (wall, rate) in zip(events, events[1:], strict=False):
        total += rate * (wall - before)
        trace.append((wall - t0, total))
    return trace


def _log_tail(log_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n" + p.read_text()[-1500:] for p in sorted(log_dir.glob("*")))


@dataclass
class JobRun:
    """What a finished job left: its trainer scalars and its generators' CPU use."""

    scalars: dict[str, list[tuple[float, float]]]  # tag -> [(wall time, value)] by step
    gen_cpu: list[tuple[float, float]]  # (wall time, CPU seconds of all generator ranks)


def run_job(config: str, overrides: list[str], trainers: int, generators: int, seconds: float,
            pin: bool, work: Path) -> JobRun:
    """Run the job for `seconds` after its first step, stop it, return what it measured."""
    world = trainers + generators
    out, logs = work / f"job-{time.monotonic_ns()}", work / f"logs-{time.monotonic_ns()}"
    logs.mkdir(parents=True)
    cores = sorted(os.sched_getaffinity(0))
    args = ["train", "--config", config, f"output_dir={out}", *JOB, *overrides,
            f"roles.generators={generators}"]
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "PYTHONUNBUFFERED": "1"}
        env.pop("ONLINE_STABLEREP_PIN_CORES", None)
        if pin:
            env["OMP_NUM_THREADS"] = "1"
        core = cores[rank % len(cores)] if pin else None
        log = open(logs / f"rank{rank}.log", "w")  # noqa: SIM115 (closed with the process)
        procs.append(subprocess.Popen(command("online_stablerep.cli", args, core), cwd=ROOT,
                                      env=env, stdout=log, stderr=subprocess.STDOUT))
    gen_cpu = []
    try:
        # 1. Wait for the first trained step, then let the job run, sampling generator CPU.
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        first_step = re.compile(r"\] step \d+/")
        while not first_step.search((logs / "rank0.log").read_text()):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"the job did not reach its first step:\n{_log_tail(logs)}")
            time.sleep(0.2)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a rank exited during the run:\n{_log_tail(logs)}")
            gen_cpu.append((time.time(), sum(cpu_seconds(p.pid) for p in procs[trainers:])))
            time.sleep(0.2)
        # 2. Stop: trainers flush their events and tell the generators.
        for proc in procs[:trainers]:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=90)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    scalars = _scalars(out / "tensorboard" / "train")
    if "gen/images_per_s" not in scalars:
        raise RuntimeError(f"the job wrote no gen/images_per_s scalars:\n{_log_tail(logs)}")
    return JobRun(scalars, gen_cpu)


def job_figures(job: JobRun, generators: int, warmup_s: float, chunk_s: float
                ) -> dict[str, Any]:
    """Generator and trainer figures of a job's steady part."""
    scalars = job.scalars
    wall0 = scalars["gen/images_per_s"][0][0]
    gen = steady_rate(_cumulative(scalars["gen/images_per_s"]), warmup_s, chunk_s)
    gen_cpu_s = cpu_used(job.gen_cpu, wall0 + gen.t0, wall0 + gen.t1)
    train_trace = _cumulative(scalars["train/images_per_s"])
    idle_trace = _cumulative(scalars["train/idle_fraction"])
    mb_trace = _cumulative(scalars["transport/MB_per_s"])
    kept = [i for i, (t, _) in enumerate(train_trace) if t >= warmup_s]
    first, last = kept[0], kept[-1]
    seconds = train_trace[last][0] - train_trace[first][0]
    return {
        "gen_images_per_s": gen.rate, **spread(gen.chunks, "gen_images_per_s"),
        # The share of its core each generator rank got: the machine may be shared.
        "gen_cpu_share": gen_cpu_s / (gen.t1 - gen.t0) / generators,
        "gen_images_per_cpu_s": gen.rate * (gen.t1 - gen.t0) / gen_cpu_s,
        "gen_idle_fraction": scalars["gen/idle_fraction"][-1][1],
        "train_images_per_s": (train_trace[last][1] - train_trace[first][1]) / seconds,
        "train_idle_fraction": (idle_trace[last][1] - idle_trace[first][1]) / seconds,
        "mean_reuse": scalars["buffer/mean_reuse"][-1][1],
        "transport_MB_per_s": (mb_trace[last][1] - mb_trace[first][1]) / seconds,
        "steps": len(train_trace), "measured_s": gen.t1 - gen.t0,
    }


def standalone_figures(traces: list[list[tuple[float, float, float]]], warmup_s: float,
                       chunk_s: float) -> dict[str, Any]:
    """The standalone producer's steady figures, over every run of it."""
    runs = []
    for trace in traces:
        steady = steady_rate([(t, c) for t, c, _ in trace], warmup_s, chunk_s)
        cpu = cpu_used([(t, u) for t, _, u in trace], steady.t0, steady.t1)
        runs.append((steady, cpu))
    images = sum(st.rate * (st.t1 - st.t0) for st, _ in runs)
    return {
        "standalone_images_per_s": sum(st.rate for st, _ in runs) / len(runs),
        "standalone_images_per_s_runs": [st.rate for st, _ in runs],
        **spread([c for st, _ in runs for c in st.chunks], "standalone_images_per_s"),
        "standalone_cpu_share": sum(cpu for _, cpu in runs) / sum(st.t1 - st.t0 for st, _ in runs),
        "standalone_images_per_cpu_s": images / sum(cpu for _, cpu in runs),
    }


# ---- the benchmark ----------------------------------------------------------------------------


def queue_cost(name: str, config: str, overrides: list[str], s: dict[str, Any], core: int | None,
               device: torch.device, work: Path) -> dict[str, Any]:
    """Standalone, job, standalone (the machine may be shared): both sides of the ratio back to
    back, 1 trainer + 1 generator."""
    sides = [run_standalone(config, overrides, s["standalone_s"], core, device, work)]
    load = os.getloadavg()[0]
    job = job_figures(run_job(config, overrides, 1, 1, s["hybrid_s"], s["pin"], work), 1,
                      s["warmup_s"], s["chunk_s"])
    if s["standalone_after"]:
        sides.append(run_standalone(config, overrides, s["standalone_s"], core, device, work))
    alone = standalone_figures(sides, s["warmup_s"], s["chunk_s"])
    return {"run": f"1T+1G {name} (queue cost)", "producer": name, "config": config,
            "trainers": 1, "generators": 1, **job, **alone,
            "hybrid_over_standalone": job["gen_images_per_s"] / alone["standalone_images_per_s"],
            "hybrid_over_standalone_per_cpu_s":
                job["gen_images_per_cpu_s"] / alone["standalone_images_per_cpu_s"],
            "load_avg_1min": load}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["standalone"]:
        return standalone_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, warmup=0, reps=1)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every run's duration (and warm-up) by this")
    parser.add_argument("--producers", default=None,
                        help="comma-separated producers for the queue-cost runs (default: all)")
    parser.add_argument("--no-splits", action="store_true", help="skip the split sweep")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra config override for every run (repeatable)")
    parser.add_argument("--once", action="store_true",
                        help="run the standalone producer only before the job, not after too")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    s = dict(SETTINGS[device.type])
    s["standalone_after"] = s["standalone_after"] and not args.once
    for key in ("standalone_s", "hybrid_s", "split_s", "warmup_s", "chunk_s"):
        s[key] *= args.scale
    producers = PRODUCERS[device.type]
    names = args.producers.split(",") if args.producers else list(producers)
    cores = sorted(os.sched_getaffinity(0))
    # The standalone producer gets the core the job's generator rank (rank 1) is pinned to.
    gen_core = cores[1 % len(cores)] if s["pin"] else None
    threads = (["train.cpu_threads=1"] if device.type == "cpu" else []) + args.set
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"load_avg_before": list(os.getloadavg())}
    plan = [("ratio", name) for name in names]
    plan += [] if args.no_splits else [("split", split) for split in s["splits"]]
    with tempfile.TemporaryDirectory(prefix="bench-hybrid-") as tmp:
        for kind, item in tqdm(plan, desc="hybrid benchmark"):
            if kind == "ratio":
                config, extra = producers[item]
                row = queue_cost(item, config, [*extra, *threads], s, gen_core, device, Path(tmp))
                for key in ("hybrid_over_standalone", "hybrid_over_standalone_per_cpu_s",
                            "gen_images_per_s", "standalone_images_per_s",
                            "train_idle_fraction", "gen_idle_fraction"):
                    summary[f"{item}_{key}"] = row[key]
            else:
                trainers, generators = item
                config, extra = producers[s["split_producer"]]
                load = os.getloadavg()[0]
                job = run_job(config, [*extra, *threads], trainers, generators, s["split_s"],
                              s["pin"], Path(tmp))
                row = {"run": f"{trainers}T+{generators}G {s['split_producer']}",
                       "producer": s["split_producer"], "config": config, "trainers": trainers,
                       "generators": generators,
                       **job_figures(job, generators, s["warmup_s"], s["chunk_s"]),
                       "load_avg_1min": load}
            rows.append(row)
            tqdm.write(f"{row['run']}: gen {row['gen_images_per_s']:.1f} img/s "
                       f"(cpu share {row['gen_cpu_share']:.2f}), train "
                       f"{row['train_images_per_s']:.1f} img/s, idle "
                       f"{row['train_idle_fraction']:.0%}, reuse {row['mean_reuse']:.2f}"
                       + (f"; standalone {row['standalone_images_per_s']:.1f} img/s (cpu share "
                          f"{row['standalone_cpu_share']:.2f}), ratio "
                          f"{row['hybrid_over_standalone']:.3f}, per CPU-second "
                          f"{row['hybrid_over_standalone_per_cpu_s']:.3f}"
                          if kind == "ratio" else ""))
    summary["load_avg_after"] = list(os.getloadavg())
    settings = {**s, "producers": {n: producers[n] for n in names}, "job_overrides": JOB,
                "cores": cores, "torch_threads": 1 if device.type == "cpu" else None}
    paths = write_results("hybrid", device, settings, summary, rows, args.out)
    png = plot_bars(
        args.out / f"hybrid-{machine_name(device)}.png", f"hybrid job, {machine_name(device)} (generators: median and IQR over "
        f"{s['chunk_s']:g} s windows)",
        "images/s", [r["run"].replace(" (queue cost)", "") for r in rows],
        {"generator (job)": [r["gen_images_per_s_median"] for r in rows],
         "generator (standalone)": [r.get("standalone_images_per_s_median", 0.0) for r in rows],
         "trainer": [r["train_images_per_s"] for r in rows]},
        {"generator (job)": [(r["gen_images_per_s_p25"], r["gen_images_per_s_p75"])
                             for r in rows],
         "generator (standalone)": [(r.get("standalone_images_per_s_p25", 0.0),
                                     r.get("standalone_images_per_s_p75", 0.0)) for r in rows]},
    )
    print(f"wrote {paths['json']}, {paths['csv']}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
