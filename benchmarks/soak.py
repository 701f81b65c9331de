"""Soak: the hybrid CPU demo through launch/train.sh for a long time, sampling every rank's
resident memory and the trainer's replay-buffer size, to show that nothing grows.

    python benchmarks/soak.py                    # one hour
    python benchmarks/soak.py --minutes 20       # shorter

1. Starts `launch/train.sh` (config `cpu_demo`, train.steps large enough never to end) in a
   temporary output_dir; the ranks' last words (`output_dir/ranks/rankN.json`) give their PIDs.
2. Every `--every` seconds: each rank's RSS (/proc/PID/status VmRSS), the trainer's newest
   console figures (step, buffer groups).
3. After `--minutes`, SIGTERM to the wrapper (the job's own stop path): every rank stops, the
   trainer saves a checkpoint; the time that takes and the exit code are recorded.
Growth per rank: median RSS of the last 20% of samples over the median of the first 20% after
warm-up (the first `--warmup` minutes: model build, first checkpoint, buffer filling).
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


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def growth(values: list[float]) -> float:
    """Median of the last fifth over the median of the first fifth, minus one."""
    fifth = max(1, len(values) // 5)
    return statistics.median(values[-fifth:]) / statistics.median(values[:fifth]) - 1


def plot(samples: list[dict], ranks: list[int], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    minutes = [s["t_s"] / 60 for s in samples]
    for r in ranks:
        top.plot(minutes, [s["rss_mb"].get(str(r)) for s in samples], label=f"rank {r}")
    top.set_ylabel("resident memory (MB)")
    top.legend()
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
                                "rss_mb": {str(r): rss_mb(pid) for r, pid in ranks.items()}})
                print(f"{samples[-1]['t_s'] / 60:5.1f} min  step {step}  buffer {buffer}  "
                      + "  ".join(f"rank{r} {v:.0f} MB" for r, v in samples[-1]["rss_mb"].items()
                                  if v), flush=True)
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
    per_rank = {}
    for r in sorted(ranks):
        values = [s["rss_mb"][str(r)] for s in counted if s["rss_mb"].get(str(r))]
        per_rank[f"rank{r}"] = {"first_mb": round(values[0], 1), "last_mb": round(values[-1], 1),
                                "max_mb": round(max(values), 1),
                                "growth_pct": round(100 * growth(values), 2)}
    buffers = [s["buffer_groups"] for s in counted]
    summary = {
        "minutes": args.minutes, "warmup_minutes": args.warmup, "samples": len(counted),
        "steps": samples[-1]["step"] if samples else 0,
        "rss": per_rank,
        "buffer_groups": {"min": min(buffers), "max": max(buffers),
                          "median": statistics.median(buffers)} if buffers else {},
        "sigterm_exit_code": code, "sigterm_stop_s": round(stop_s, 1),
        "job_line": log.read_text().strip().splitlines()[-1],
    }
    rows = [{"t_s": s["t_s"], "step": s["step"], "buffer_groups": s["buffer_groups"],
             **{f"rss_mb_rank{r}": s["rss_mb"].get(str(r)) for r in sorted(ranks)}}
            for s in samples]
    device = torch.device("cpu")
    paths = write_results("soak", device, {"config": args.config, "overrides": overrides,
                                           "every_s": args.every}, summary, rows)
    png = RESULTS / f"soak-{machine_name(device)}.png"
    plotted = plot(samples, sorted(ranks), png)
    print(json.dumps(summary, indent=2))
    print(f"wrote {paths['json']}" + (f" and {png}" if plotted else " (no matplotlib: no plot)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
