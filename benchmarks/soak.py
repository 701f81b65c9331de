"""Soak: the hybrid CPU demo through launch/train.sh for a long time, sampling every rank's
resident memory, open files, threads and shared memory and the trainer's replay-buffer size, to
show that nothing grows and nothing is lost.

    python benchmarks/soak.py                    # one hour
    python benchmarks/soak.py --minutes 20       # shorter

1. Starts `launch/train.sh` (config `cpu_demo`, train.steps large enough never to end) in a
   temporary output_dir; the ranks' last words (`output_dir/ranks/rankN.json`) give their PIDs.
2. Every `--every` seconds: each rank's resident memory (/proc/PID/status VmRSS), shared
   memory (RssShmem), threads (Threads) and open files (/proc/PID/fd), the trainer's newest
   console figures (step, buffer groups).
3. After `--minutes`, SIGTERM to the wrapper (the job's own stop path): every rank stops, the
   trainer saves a checkpoint; the time that takes and the exit code are recorded, and the
   groups every generator sent are checked against those the trainers received ("nothing lost":
   every group sent arrived, none was evicted unused).
Growth per rank and figure: median of the last 20% of samples over the median of the first 20%
after warm-up (the first `--warmup` minutes: model build, first checkpoint, buffer filling);
`flat` says whether every figure of every rank stayed within 5%.
Writes benchmarks/results/soak-<machine>.{json,csv} (+ .png with matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import machine_name, write_results
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STEP = re.compile(r"train rank 0\] step (\d+)/\d+ .* buffer (\d+) ")
SENT = re.compile(r"generator rank (\d+)\] sent (\d+) groups")
RECEIVED = re.compile(r"train rank (\d+)\] received (\d+) groups in all .* (\d+) evicted unused")
# What is sampled per rank: name -> (unit, how it is read from /proc/PID).
FIGURES = ("rss_mb", "shmem_mb", "threads", "open_files")
FLAT_PCT = 5.0


def resources(pid: int) -> dict[str, float] | None:
    """A rank's resident and shared memory (MB), threads and open files; None once it is gone."""
    try:
        fields = dict(line.split(":", 1) for line in
                      Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024,
                "shmem_mb": int(fields["RssShmem"].split()[0]) / 1024,
                "threads": int(fields["Threads"]),
                "open_files": len(os.listdir(f"/proc/{pid}/fd"))}
    except (OSError, KeyError, ValueError):
        return None


def growth(values: list[float]) -> float:
    """Median of the last fifth over the median of the first fifth, minus one (0 for 0 to 0)."""
    fifth = max(1, len(values) // 5)
    first, last = statistics.median(values[:fifth]), statistics.median(values[-fifth:])
    return 0.0 if first == last else last / first - 1 if first else float("inf")


def plot(samples: list[dict], ranks: list[int], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = {"rss_mb": "resident (MB)", "shmem_mb": "shared mem (MB)", "threads": "threads",
              "open_files": "open files"}
    fig, axes = plt.subplots(len(FIGURES) + 1, 1, figsize=(8, 11), sharex=True)
    minutes = [s["t_s"] / 60 for s in samples]
    for ax, figure in zip(axes, FIGURES, strict=False):
        for r in ranks:
            ax.plot(minutes, [(s["ranks"].get(str(r)) or {}).get(figure) for s in samples],
                    label=f"rank {r}")
        ax.set_ylabel(labels[figure])
    axes[0].legend()
    bottom = axes[-1]
    bottom.plot(minutes, [s["buffer_groups"] for s in samples])
    bottom.set_ylabel("buffer (groups)")
    bottom.set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=3.0, help="minutes not counted")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--config", default="cpu_demo")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where results go")
    parser.add_argument("overrides", nargs="*", help="extra key=value for the job")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    out, log = work / "run", work / "job.log"
    env = {**os.environ, "NUM_GPUS": "0", "MASTER_PORT": str(free_port()),
           "PYTHON": sys.executable}
    overrides = [f"output_dir={out}", "train.steps=100000000", *args.overrides]
    # 1. The job, through the real wrapper.
    job = subprocess.Popen(["bash", str(ROOT / "launch/train.sh"), "--config", args.config,
                            *overrides], stdout=log.open("w"), stderr=subprocess.STDOUT,
                           env=env, cwd=ROOT)
    samples: list[dict] = []
    start = time.monotonic()
    ranks: dict[int, int] = {}
    try:
        # 2. Sample until the time is up.
        while time.monotonic() - start < args.minutes * 60:
            if job.poll() is not None:
                raise RuntimeError(f"the job ended early:\n{log.read_text()[-3000:]}")
            for path in (out / "ranks").glob("rank*.json"):
                word = json.loads(path.read_text())
                ranks[word["rank"]] = word["pid"]
            found = STEP.findall(log.read_text())
            if ranks and found:
                step, buffer = map(int, found[-1])
                samples.append({"t_s": round(time.monotonic() - start, 1), "step": step,
                                "buffer_groups": buffer,
                                "ranks": {str(r): resources(pid) for r, pid in ranks.items()}})
                print(f"{samples[-1]['t_s'] / 60:5.1f} min  step {step}  buffer {buffer}  "
                      + "  ".join(f"rank{r} {v['rss_mb']:.0f} MB {v['threads']} threads "
                                  f"{v['open_files']} files"
                                  for r, v in samples[-1]["ranks"].items() if v), flush=True)
            time.sleep(args.every)
        # 3. Stop it the way a scheduler would.
        stop_at = time.monotonic()
        job.send_signal(signal.SIGTERM)
        code = job.wait(timeout=300)
        stop_s = time.monotonic() - stop_at
    finally:
        if job.poll() is None:
            job.kill()
    counted = [s for s in samples if s["t_s"] >= args.warmup * 60]
    per_rank: dict[str, dict] = {}
    for r in sorted(ranks):
        per_rank[f"rank{r}"] = {}
        for figure in FIGURES:
            values = [s["ranks"][str(r)][figure] for s in counted if s["ranks"].get(str(r))]
            per_rank[f"rank{r}"][figure] = {
                "first": round(values[0], 1), "last": round(values[-1], 1),
                "max": round(max(values), 1), "growth_pct": round(100 * growth(values), 2)}
    flat = all(abs(f["growth_pct"]) <= FLAT_PCT for r in per_rank.values() for f in r.values())
    text = log.read_text()
    sent = {int(r): int(n) for r, n in SENT.findall(text)}
    received = {int(r): int(n) for r, n, _ in RECEIVED.findall(text)}
    evicted = sum(int(e) for _, _, e in RECEIVED.findall(text))
    buffers = [s["buffer_groups"] for s in counted]
    summary = {
        "minutes": args.minutes, "warmup_minutes": args.warmup, "samples": len(counted),
        "steps": samples[-1]["step"] if samples else 0,
        "resources": per_rank, f"flat_within_{FLAT_PCT:g}_pct": flat,
        "groups_sent": sent, "groups_received": received, "evicted_unused": evicted,
        "nothing_lost": bool(sent) and sum(sent.values()) == sum(received.values())
        and evicted == 0,
        "buffer_groups": {"min": min(buffers), "max": max(buffers),
                          "median": statistics.median(buffers)} if buffers else {},
        "sigterm_exit_code": code, "sigterm_stop_s": round(stop_s, 1),
        "job_line": log.read_text().strip().splitlines()[-1],
    }
    rows = [{"t_s": s["t_s"], "step": s["step"], "buffer_groups": s["buffer_groups"],
             **{f"{figure}_rank{r}": (s["ranks"].get(str(r)) or {}).get(figure)
                for r in sorted(ranks) for figure in FIGURES}}
            for s in samples]
    device = torch.device("cpu")
    paths = write_results("soak", device, {"config": args.config, "overrides": overrides,
                                           "every_s": args.every}, summary, rows,
                          out_dir=args.results)
    png = args.results / f"soak-{machine_name(device)}.png"
    plotted = plot(samples, sorted(ranks), png)
    print(json.dumps(summary, indent=2))
    print(f"wrote {paths['json']}" + (f" and {png}" if plotted else " (no matplotlib: no plot)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
