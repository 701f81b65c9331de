"""Helpers every benchmark script shares: the machine's name, a warm-up + repetitions timer with
median and spread, results as JSON and CSV in benchmarks/results/, and PNG plots.

`write_results` gives results files one layout: top-level `benchmark` (script name), `machine`,
`device`, `torch`, `date`, `settings`, `summary` (the headline figures) and `rows` (one dict per
measured configuration). `online-stablerep plan --from-results` reads trainer-*.json rows.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_name(device: torch.device) -> str:
    """A file-name slug naming the hardware: "cpu-2core" or e.g. "nvidia-h100-80gb-hbm3"."""
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return f"cpu-{os.cpu_count()}core"


def device_description(device: torch.device) -> str:
    """Human-readable device, written into every results file."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
           f"{torch.get_num_threads()} torch threads"


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Seconds of each timed repetition (warm-up excluded)."""

    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def quantile(self, q: float) -> float:
        """Linear-interpolated quantile q in [0, 1] of the repetition times."""
        ordered = sorted(self.seconds)
        position = q * (len(ordered) - 1)
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    def rates(self, items: float, prefix: str) -> dict[str, float]:
        """Items/s at the median and at the interquartile bounds, as result-row fields."""
        return {
            f"{prefix}": items / self.median,
            f"{prefix}_p25": items / self.quantile(0.75),
            f"{prefix}_p75": items / self.quantile(0.25),
        }

    def fields(self, prefix: str = "seconds") -> dict[str, float]:
        """Median, quartiles, min and max of the times, as result-row fields."""
        return {
            f"{prefix}_median": self.median,
            f"{prefix}_p25": self.quantile(0.25),
            f"{prefix}_p75": self.quantile(0.75),
            f"{prefix}_min": min(self.seconds),
            f"{prefix}_max": max(self.seconds),
            "repetitions": len(self.seconds),
        }


def time_it(
    fn: Callable[[], Any], device: torch.device, warmup: int, reps: int, desc: str = ""
) -> Timing:
    """Run `fn` warmup + reps times under a progress bar; time each rep (device synchronised).

    Raises:
        ValueError: when reps < 1 or warmup < 0.
    """
    if reps < 1 or warmup < 0:
        raise ValueError(f"need reps >= 1 and warmup >= 0, got reps={reps} warmup={warmup}")
    seconds = []
    for index in tqdm(range(warmup + reps), desc=desc, leave=False, mininterval=1.0):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        if index >= warmup:
            seconds.append(time.perf_counter() - start)
    return Timing(seconds)


def add_common_arguments(parser: argparse.ArgumentParser, warmup: int, reps: int) -> None:
    """--device, --warmup, --reps and --out, shared by every benchmark script."""
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where to run (cuda: the current CUDA device)")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed repetitions first")
    parser.add_argument("--reps", type=int, default=reps, help="timed repetitions")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR,
                        help="folder for the JSON, CSV and PNG results")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0 = torch's default). One by default: on a "
                             "shared machine oversubscribed OpenMP threads made CPU steps 25x "
                             "slower and their times erratic")


def resolve_device(name: str, threads: int = 0) -> torch.device:
    """The device named by --device (ValueError when CUDA is asked for and absent); sets the
    torch CPU threads when `threads` > 0."""
    if threads > 0:
        torch.set_num_threads(threads)
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else \
        torch.device("cpu")


def write_results(
    benchmark: str,
    device: torch.device,
    settings: dict[str, Any],
    summary: dict[str, Any],
    rows: list[dict[str, Any]],
    out_dir: Path = RESULTS_DIR,
) -> dict[str, Path]:
    """Write `<benchmark>-<machine>.json` (everything) and `.csv` (the rows).

    Returns:
        {"json": path, "csv": path}.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{benchmark}-{machine_name(device)}"
    document = {
        "benchmark": benchmark,
        "machine": machine_name(device),
        "device": device_description(device),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "summary": summary,
        "rows": rows,
    }
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    csv_path = stem.with_suffix(".csv")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return {"json": json_path, "csv": csv_path}


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bars(
    path: Path,
    title: str,
    ylabel: str,
    categories: list[str],
    series: dict[str, list[float]],
    spread: dict[str, list[tuple[float, float]]] | None = None,
) -> Path:
    """Grouped bar chart: one group per category, one bar per series, optional (low, high)
    error bars (e.g. the interquartile range)."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(categories) * len(series)), 4))
    width = 0.8 / max(1, len(series))
    for index, (name, values) in enumerate(series.items()):
        x = [c + (index - (len(series) - 1) / 2) * width for c in range(len(categories))]
        errors = None
        if spread and name in spread:
            errors = [[v - lo for v, (lo, _) in zip(values, spread[name], strict=True)],
                      [hi - v for v, (_, hi) in zip(values, spread[name], strict=True)]]
        ax.bar(x, values, width, label=name, yerr=errors, capsize=3)
    ax.set_xticks(range(len(categories)), categories)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_lines(
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
    x: list[float],
    series: dict[str, list[float]],
    spread: dict[str, list[tuple[float, float]]] | None = None,
) -> Path:
    """Line chart of a sweep: one line per series over x, optional shaded (low, high) band."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in series.items():
        ax.plot(x, values, marker="o", label=name)
        if spread and name in spread:
            ax.fill_between(x, [lo for lo, _ in spread[name]], [hi for _, hi in spread[name]],
                            alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
