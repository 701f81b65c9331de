"""What the reuse experiment (benchmarks/reuse.py) measured, for the planner to cite beside the
config's replay.max_reuse: probe top-1 at equal training steps for each max_reuse R, and the
largest R whose probe stays within a tolerance of fresh images (R = 1)."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

# Results of the source checkout (absent when the package is installed without the repo).
RESULTS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
# Probe points (top-1) a reuse may cost and still count as supported.
TOLERANCE = 0.02


@dataclass(frozen=True)
class ReuseEvidence:
    source: Path
    steps: int
    seeds: int
    # R -> mean linear-probe top-1 over seeds (random draws, k of the main grid).
    top1_by_reuse: dict[int, float]

    @property
    def supported_reuse(self) -> int:
        """The largest R whose mean probe is within TOLERANCE of R = 1's (1 if R = 1 is absent)."""
        base = self.top1_by_reuse.get(1)
        if base is None:
            return 1
        return max(r for r, top1 in self.top1_by_reuse.items() if top1 >= base - TOLERANCE)

    def note(self) -> str:
        scores = ", ".join(f"R={r} {top1:.3f}" for r, top1 in sorted(self.top1_by_reuse.items()))
        return (f"measured reuse cost ({self.source.name}: CPU procedural run, {self.steps} "
                f"steps, {self.seeds} seeds; probe top-1 {scores}): reuse up to "
                f"{self.supported_reuse} stayed within {TOLERANCE * 100:.0f} points of fresh "
                "images there; a proxy for SD images, not a measurement of them")


def load_reuse_evidence(results_dir: Path = RESULTS_DIR) -> ReuseEvidence | None:
    """The newest reuse-*.json in results_dir, or None when there is none."""
    files = sorted(results_dir.glob("reuse-*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        return None
    document = json.loads(files[-1].read_text())
    rows = [r for r in document["rows"] if r["draw"] == "random"]
    main_k = max((r["k"] for r in rows), default=0)
    by_reuse: dict[int, list[float]] = {}
    for row in rows:
        if row["k"] == main_k:
            by_reuse.setdefault(int(row["max_reuse"]), []).append(float(row["linear_top1"]))
    if not by_reuse:
        return None
    return ReuseEvidence(
        source=files[-1],
        steps=int(document["settings"]["steps"]),
        seeds=max(len(v) for v in by_reuse.values()),
        top1_by_reuse={r: statistics.fmean(v) for r, v in by_reuse.items()},
    )
