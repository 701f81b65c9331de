"""What the TensorBoard CUSTOM SCALARS tab opens on: the operator's questions first (is the job
balanced, who is idle, how is each image reused, is the loss moving), and the rule for moving
GPUs between roles (veRL's: trainer idle high and generator idle low means generation-bound,
the reverse training-bound)."""

from __future__ import annotations


def custom_scalars_layout() -> dict:
    """The layout for `SummaryWriter.add_custom_scalars`: category -> chart -> [kind, tags]
    (tags are regular expressions)."""
    return {
        "1 Balance": {
            "images made/s (all generators) vs images trained/s": [
                "Multiline", [r"gen/images_per_s$", r"train/images_per_s$"]],
            "reuse: implied (trained / made) and measured (buffer)": [
                "Multiline", [r"balance/implied_reuse", r"buffer/mean_reuse"]],
        },
        "2 Idle": {
            "idle: trainer high + generator low = generation-bound; the reverse = "
            "training-bound": [
                "Multiline", [r"train/idle_fraction", r"gen/idle_fraction$"]],
        },
        "3 Replay": {
            "pool size (groups held)": ["Multiline", [r"buffer/groups", r"buffer/unused"]],
            "mean reuse": ["Multiline", [r"buffer/mean_reuse"]],
            "batch overlap (fraction repeated from the previous batch)": [
                "Multiline", [r"buffer/batch_overlap"]],
            "group age at use (s)": ["Multiline", [r"buffer/age_s"]],
        },
        "4 Loss": {
            "total and each term": ["Multiline", [r"train/loss.*"]],
        },
        "5 Learning rate": {
            "learning rate": ["Multiline", [r"train/lr"]],
        },
    }


class BalanceAdvisor:
    """A one-line console suggestion when a run stays clearly unbalanced for `patience` log
    intervals in a row (said once per streak)."""

    def __init__(self, patience: int = 3, high: float = 0.5, low: float = 0.1) -> None:
        self.patience, self.high, self.low = patience, high, low
        self._streak: tuple[str, int] = ("", 0)

    def observe(self, trainer_idle: float, generator_idle: float | None) -> str | None:
        if trainer_idle > self.high and (generator_idle is None or generator_idle < self.low
                                         or generator_idle <= trainer_idle):
            kind = "generation"
        elif generator_idle is not None and generator_idle > self.high and trainer_idle < self.low:
            kind = "training"
        else:
            kind = ""
        name, count = self._streak
        count = count + 1 if kind == name else 1
        self._streak = (kind, count)
        if not kind or count != self.patience:
            return None
        if kind == "generation":
            return (f"generation-bound: trainers idle {trainer_idle:.0%} for {count} log "
                    "intervals; more generator ranks, a faster recipe (generator.recipe), or "
                    "higher replay.max_reuse (see `online-stablerep plan`)")
        return (f"training-bound: generators idle {generator_idle:.0%} for {count} log "
                "intervals; move GPUs to training (fewer generator ranks) or lower "
                "replay.max_reuse (see `online-stablerep plan`)")
