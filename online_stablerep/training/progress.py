"""What the trainer reports while it trains: the figures of every train.log_every steps (loss,
learning rate, throughput, idle time, the buffer, the source, implied reuse, balance advice) to
the metric sink and a console line, and the grid of the newest groups received."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from online_stablerep.config.schema import Config
from online_stablerep.monitoring.layout import BalanceAdvisor, custom_scalars_layout
from online_stablerep.monitoring.metrics import MetricSink, console
from online_stablerep.monitoring.preview import render_grid
from online_stablerep.training.sources import BatchSource


def train_line(step: int, steps: int, loss: float, images_per_s: float,
               values: dict[str, float]) -> str:
    """The console line of one log step."""
    return (
        f"step {step}/{steps} loss {loss:.4f} "
        f"lr {values['train/lr']:.2e} {images_per_s:.1f} img/s "
        f"idle {values['train/idle_fraction']:.0%} "
        f"buffer {values['buffer/groups']:.0f} reuse {values['buffer/mean_reuse']:.2f} "
        f"overlap {values['buffer/batch_overlap']:.0%} "
        f"spread {values['buffer/use_spread_steps']:.1f} steps"
    )


class ProgressLog:
    """Every trainer rank computes the figures (the balance advisor sees each log step);
    rank 0 writes them, with the TensorBoard layout once at the start."""

    def __init__(
        self,
        cfg: Config,
        source: BatchSource,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        sink: MetricSink,
        compare: Callable[[dict[str, float]], str] | None,
        rank: int,
        global_rank: int,
        world: int,
    ) -> None:
        self.cfg = cfg
        self.source = source
        self.scheduler = scheduler
        self.sink = sink
        # Turns the logged figures into a console line comparing them with the plan.
        self.compare = compare
        self.rank = rank
        self.global_rank = global_rank
        self.world = world
        self.n = cfg.batch.captions_per_batch
        self.k = cfg.batch.views_per_caption
        # Views trained and images received at the previous log step (implied reuse).
        self._balance0: tuple[int, int] | None = None
        self.advisor = BalanceAdvisor()
        if self.rank == 0:
            self.sink.layout(custom_scalars_layout())

    def log(self, step: int, terms: dict[str, torch.Tensor], loss: float, t0: float,
            idle0: float, steps: int) -> None:
        """The figures at `step`, `steps` steps since `t0` (perf_counter) and `idle0` (the
        source's idle seconds then)."""
        elapsed = max(time.perf_counter() - t0, 1e-9)
        images_per_s = steps * self.n * self.k * self.world / elapsed
        idle = (self.source.idle_seconds() - idle0) / elapsed
        values = {
            "train/loss": loss,
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/images_per_s": images_per_s,
            "train/idle_fraction": min(1.0, idle),
        }
        values.update({f"train/{k}": float(v.detach()) for k, v in terms.items() if k != "loss"})
        values.update({f"buffer/{k}": v for k, v in self.source.buffer.stats().items()})
        values.update(self.source.metrics())
        counters = self.source.buffer.counters()
        trained, received = step * self.n * self.k, counters["images_added"]
        if self._balance0 is not None and received > self._balance0[1]:
            # Views each image received since the last log served: what the balance implies.
            values["balance/implied_reuse"] = (
                (trained - self._balance0[0]) / (received - self._balance0[1]))
        self._balance0 = (trained, received)
        advice = self.advisor.observe(values["train/idle_fraction"], values.get("gen/idle_fraction"))
        if self.rank == 0:
            self.sink.scalars(values, step)
            console(train_line(step, self.cfg.train.steps, loss, images_per_s, values),
                    rank=self.global_rank)
            if self.compare is not None:
                console(self.compare(values), rank=self.global_rank)
            if advice:
                console(advice, rank=self.global_rank)

    def grid(self, step: int) -> None:
        """The newest groups received, each a row of every image its generator made, with
        caption, caption id, guidance and epoch."""
        groups = self.source.buffer.newest(4)
        if not groups:
            return
        grid = render_grid(groups, title=f"newest groups received at step {step}", cell=96)
        # np.array copies: a PIL image's buffer is read-only, which torch warns about on every grid
        image = torch.from_numpy(np.array(grid)).permute(2, 0, 1).contiguous()
        self.sink.image("buffer/received_groups", image, step)
