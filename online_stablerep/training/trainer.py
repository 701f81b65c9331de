"""The Trainer: a DeepSpeed engine over the trainer group, fed by a BatchSource. The same class
serves colocated mode (producer in-process) and hybrid mode (generator ranks)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.runtime.base_optimizer import ZeROOptimizer

from online_stablerep.config.schema import Config
from online_stablerep.distributed.env import get_rank, get_world_size
from online_stablerep.distributed.groups import JobGroups
from online_stablerep.faults import injected
from online_stablerep.losses import StableRepLoss
from online_stablerep.models.encoder import build_model
from online_stablerep.monitoring.metrics import MetricSink, console
from online_stablerep.records import TrainBatch
from online_stablerep.training import checkpoint as ckpt
from online_stablerep.training.audit import AuditRecorder
from online_stablerep.training.augment import DeviceAugment
from online_stablerep.training.engine import build_engine, peak_lr, use_autocast, use_bf16
from online_stablerep.training.progress import ProgressLog
from online_stablerep.training.sources import BatchSource

# train.on_nonfinite=skip gives up after this many non-finite losses in a row: the weights
# that produced them do not change while steps are skipped.
MAX_CONSECUTIVE_SKIPS = 10


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    """What a finished (or stopped) run did."""

    steps: int
    losses: list[float]
    stopped_because: str
    checkpoint: Path | None


class Trainer:
    """Trains the StableRep model on batches from `source` for `cfg.train.steps` steps."""

    def __init__(
        self,
        cfg: Config,
        groups: JobGroups,
        source: BatchSource,
        device: torch.device,
        sink: MetricSink | None = None,
        compare: Callable[[dict[str, float]], str] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        if cfg.train.steps < 1:
            raise ValueError("train.steps=0: resolve the schedule from the corpus first "
                             "(config/schedule.py, as jobs/train.py does)")
        self.cfg = cfg
        # Set by SIGTERM/SIGINT: every trainer rank stops at the next step, with a checkpoint.
        self.stop = stop
        self.groups = groups
        self.group = groups.trainer
        self.source = source
        self.device = device
        self.sink = sink or MetricSink()
        # Rank inside the trainer group (checkpoint shards, seeds, audit files); console lines
        # name the global rank, as transport messages and last words do.
        self.rank = get_rank(self.group)
        self.global_rank = groups.rank
        self.world = get_world_size(self.group)
        self.bf16 = use_bf16(cfg, device)
        self.autocast = use_autocast(cfg)
        self.n = cfg.batch.captions_per_batch
        self.k = cfg.batch.views_per_caption

        # 1. Model, loss and augmentation: identical initial weights on every trainer rank,
        # then each rank's own random streams (drop path and the like) from seed + rank, as
        # the official code seeds them.
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, group=self.group if self.world > 1 else None)
        torch.manual_seed(cfg.seed + self.rank)
        self.loss_fn = StableRepLoss(cfg.loss, group=self.group if self.world > 1 else None)
        self.augment = DeviceAugment(cfg.augment, cfg.model.image_size)
        self.aug_generator = torch.Generator(device=device).manual_seed(
            cfg.seed * 1000 + self.rank
        )

        # 2. DeepSpeed engine over the trainer group only (training/engine.py).
        self.lr = peak_lr(cfg, self.world)
        self.engine = build_engine(cfg, model, self.lr, groups, self.n * self.k, self.bf16)
        self.step = 0
        self._step_delay_s = injected().step_delay_s
        # When the last checkpoint was written, or fit() began (train.checkpoint_every_minutes).
        self._saved_at = time.monotonic()
        self.losses: list[float] = []
        # (step, global mean loss on the device) not yet read back: see _flush_losses.
        self._pending: list[tuple[int, torch.Tensor]] = []
        # Caption ids and group keys of every batch (train.audit).
        self.audit = AuditRecorder()
        # compare turns the logged figures into a console line comparing them with the plan.
        self.progress = ProgressLog(cfg, source, self.engine.lr_scheduler, self.sink, compare,
                                    self.rank, self.global_rank, self.world)

    # ---- checkpoints -------------------------------------------------------------------------

    def _rank_state(self) -> dict[str, Any]:
        buffer_state, source_state = self.source.snapshot(self.cfg.replay.checkpoint_contents)
        return {
            "step": self.step,
            "optimizer": self.engine.optimizer.state_dict(),
            "scheduler": self.engine.lr_scheduler.state_dict(),
            "rng": ckpt.rng_state(),
            "aug_generator": self.aug_generator.get_state(),
            "buffer": buffer_state,
            "source": source_state,
            "losses": list(self.losses),
        }

    def save(self) -> Path:
        model_state = self.engine.module.state_dict() if self.rank == 0 else None
        t0, received0 = time.monotonic(), self.source.buffer.counters()["groups_added"]
        path = ckpt.save_checkpoint(
            self.cfg.output_dir, self.step, model_state, self._rank_state(), self.group,
            keep=self.cfg.train.keep_checkpoints, timeout_s=self.cfg.transport.collective_timeout_s,
        )
        self._saved_at = time.monotonic()
        if self.rank == 0:
            # Generation goes on while a checkpoint is written: say how much arrived meanwhile.
            received = self.source.buffer.counters()["groups_added"] - received0
            console(f"checkpoint {path.name} written in {self._saved_at - t0:.1f} s "
                    f"({received} groups received meanwhile)", rank=self.global_rank)
        return path

    def _load_optimizer(self, optimizer_state: dict[str, Any]) -> None:
        optimizer = self.engine.optimizer
        if isinstance(optimizer, ZeROOptimizer):
            # ZeRO and DeepSpeed's bf16 optimizer take one state per data-parallel rank and read
            # their own; their fp32 master weights come back from the state, not from bf16.
            shards: list[dict[str, Any] | None] = [None] * self.world
            shards[self.rank] = optimizer_state
            optimizer.load_state_dict(shards, load_from_fp32_weights=True)
        else:
            optimizer.load_state_dict(optimizer_state)

    def resume(self) -> bool:
        """Load the newest complete checkpoint of output_dir; False when there is none."""
        path = ckpt.newest_checkpoint(
            self.cfg.output_dir, warn=lambda text: console(f"warning: {text}", rank=self.global_rank))
        if path is None:
            return False
        model_state, state, _ = ckpt.load_checkpoint(path, self.rank, self.world)
        self.engine.module.load_state_dict(model_state)
        self._load_optimizer(state["optimizer"])
        self.engine.lr_scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        self.aug_generator.set_state(state["aug_generator"])
        self.source.buffer.load_state_dict(state["buffer"])
        self.source.load_state_dict(state["source"])
        self.step = int(state["step"])
        self.losses = list(state["losses"])
        console(f"resumed from {path} at step {self.step}", rank=self.global_rank)
        return True

    # ---- one step ----------------------------------------------------------------------------

    def _forward_loss(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        images = batch.images.to(self.device, non_blocking=True)
        views = self.augment(images, self.aug_generator)
        if self.bf16:
            views = views.to(torch.bfloat16)
        text_tokens = None
        if self.cfg.model.text_tower:
            from online_stablerep.models.text import tokenize

            text_tokens = tokenize(batch.captions, self.cfg.model.text_context_length)
            text_tokens = text_tokens.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            outputs = self.engine(views, views_per_caption=batch.views_per_caption,
                                  text_tokens=text_tokens)
        caption_ids = batch.caption_ids.to(self.device)
        text_ids = caption_ids[: batch.captions_per_batch] if text_tokens is not None else None
        return self.loss_fn(outputs, caption_ids, text_caption_ids=text_ids)

    def _agree(self, have: bool, stop: bool, due: bool) -> tuple[bool, bool, bool]:
        """(every trainer rank has a batch, some trainer rank was asked to stop, some trainer
        rank's clock says a checkpoint is due), in one all-reduce: the stream may end, a signal
        arrive or the time pass on one rank first, and a rank that went on alone would wait
        forever in the gradient all-reduce (or save alone at the checkpoint barrier)."""
        if self.world == 1:
            return have, stop, due
        # Host flags over the gloo trainer group: no wait for the device's queued work.
        flags = torch.tensor([float(have), float(not stop), float(not due)])
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=self.groups.trainer_host)
        return bool(flags[0]), not bool(flags[1]), not bool(flags[2])

    def _global_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of a scalar over the trainer group, left on the device (no host sync)."""
        value = value.detach().float().reshape(1).clone()
        if self.world > 1:
            dist.all_reduce(value, group=self.group)
            value /= self.world
        return value

    def _flush_losses(self) -> None:
        """Read the pending losses back in one host sync (at log steps, checkpoints and the
        end); a non-finite one stops the run naming its step, before any checkpoint holds it."""
        if not self._pending:
            return
        values = torch.cat([loss for _, loss in self._pending]).tolist()
        for (step, _), value in zip(self._pending, values, strict=True):
            if not math.isfinite(value):
                self._pending.clear()
                raise NonFiniteLossError(
                    f"non-finite loss {value} at step {step} "
                    "(train.on_nonfinite=skip drops such steps instead)"
                )
            self.losses.append(value)
        self._pending.clear()

    # ---- the loop ----------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Train until train.steps, or until the source ends; checkpoint at interval and end."""
        cfg = self.cfg.train
        self.engine.train()
        stopped = "steps"
        last_ckpt = None
        skipped = 0
        t0, idle0, steps_since = time.perf_counter(), self.source.idle_seconds(), 0
        end = min(cfg.steps, cfg.stop_after) if cfg.stop_after else cfg.steps
        # Lost work bounded in time: a checkpoint at the first step that ends past this many
        # seconds since the last one (so at most every_s + one step + one save is redone).
        every_s = cfg.checkpoint_every_minutes * 60
        self._saved_at = time.monotonic()
        if end < cfg.steps:
            stopped = f"stop_after={cfg.stop_after}"
        while self.step < end:
            # 1. Batch of n caption groups x k views (None: the caption stream ended).
            batch = self.source.next_batch()
            signalled = self.stop is not None and self.stop.is_set()
            due = every_s > 0 and time.monotonic() - self._saved_at >= every_s
            have, stop, due = self._agree(batch is not None and not signalled, signalled, due)
            if not have:
                stopped = "stopped by a signal" if stop else "stream ended"
                break
            # 2. Forward and the loss, agreed on by every trainer rank. It stays on the device
            # (read back at log steps) unless a non-finite loss must skip its step.
            terms = self._forward_loss(batch)
            mean_loss = self._global_mean(terms["loss"])
            if cfg.on_nonfinite == "skip" and not math.isfinite(loss := mean_loss.item()):
                skipped += 1
                if skipped > MAX_CONSECUTIVE_SKIPS:
                    raise NonFiniteLossError(
                        f"{skipped} consecutive non-finite losses up to step {self.step + 1}: "
                        "skipping cannot recover this run"
                    )
                console(f"skipping step {self.step + 1}: non-finite loss {loss}", rank=self.global_rank)
                self.engine.zero_grad()
                continue
            skipped = 0
            # 3. Backward and optimizer step (DeepSpeed averages gradients over the group).
            self.engine.backward(terms["loss"])
            self.engine.step()
            self.engine.module.clamp_logit_scale()
            if self._step_delay_s:
                time.sleep(self._step_delay_s)  # tests only: a slower device, to kill mid-run
            self.step += 1
            steps_since += 1
            self._pending.append((self.step, mean_loss))
            if cfg.audit:
                self.audit.record(batch, self.source.buffer)
            # 4. Monitoring and checkpoints.
            if self.step % cfg.log_every == 0 or self.step == end:
                self._flush_losses()
                self.progress.log(self.step, terms, self.losses[-1], t0, idle0, steps_since)
                t0, idle0, steps_since = time.perf_counter(), self.source.idle_seconds(), 0
            if self.rank == 0 and cfg.image_grid_every and self.step % cfg.image_grid_every == 0:
                self.progress.grid(self.step)
            if due or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
                self._flush_losses()
                last_ckpt = self.save()
        self._flush_losses()
        if last_ckpt is None or not last_ckpt.name.endswith(f"{self.step:08d}"):
            last_ckpt = self.save()
        if cfg.audit:
            self.audit.write(self.cfg.output_dir, self.rank, self.k, self.source.buffer)
        self.sink.flush()
        return TrainResult(self.step, list(self.losses), stopped, last_ckpt)
