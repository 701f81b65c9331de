"""The Trainer: a DeepSpeed engine over the trainer group, fed by a BatchSource. The same class
serves colocated mode (producer in-process) and hybrid mode (generator ranks)."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.runtime.base_optimizer import ZeROOptimizer

from online_stablerep.config.schema import Config
from online_stablerep.distributed.env import get_rank, get_world_size
from online_stablerep.distributed.groups import JobGroups, TrainerMPU
from online_stablerep.losses import StableRepLoss
from online_stablerep.models.encoder import build_model
from online_stablerep.monitoring.layout import BalanceAdvisor, custom_scalars_layout
from online_stablerep.monitoring.metrics import MetricSink, console
from online_stablerep.monitoring.preview import render_grid
from online_stablerep.records import TrainBatch
from online_stablerep.training import checkpoint as ckpt
from online_stablerep.training.augment import DeviceAugment
from online_stablerep.training.schedule import param_groups, warmup_cosine
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


def use_bf16(cfg: Config, device: torch.device) -> bool:
    """DeepSpeed's bf16 mode: bf16 weights, activations and gradients, fp32 master weights and
    optimizer state ("bf16", or "auto" on a GPU)."""
    if cfg.train.precision == "auto":
        return device.type == "cuda"
    return cfg.train.precision == "bf16"


def use_autocast(cfg: Config) -> bool:
    """The official structure ("autocast_bf16"): an fp32 engine (weights, gradients, optimizer
    state) with the forward under bf16 autocast (the official code autocasts to fp16 with a
    loss scaler; bf16 needs none)."""
    return cfg.train.precision == "autocast_bf16"


def peak_lr(cfg: Config, trainer_world: int) -> float:
    """optim.lr if set, else the official rule: base_lr x images per step / 256 / 2.

    The official main_stablerep.py scales blr by the global images per step / 256, then by
    num_crop / 2 with num_crop = 1 (its scaling assumed two crops per image); each of our k
    views is one crop of a different image, so base_lr is the official --blr.
    """
    if cfg.optim.lr > 0:
        return cfg.optim.lr
    images = cfg.batch.captions_per_batch * cfg.batch.views_per_caption * trainer_world
    return cfg.optim.base_lr * images / 256 / 2


def deepspeed_config(cfg: Config, rows_per_rank: int, bf16: bool) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": rows_per_rank,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "bf16": {"enabled": bf16},
        "gradient_clipping": cfg.optim.grad_clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


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
        # Turns the logged figures into a console line comparing them with the plan.
        self.compare = compare
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

        # 2. DeepSpeed engine over the trainer group only (an mpu keeps it off the world group).
        self.lr = peak_lr(cfg, self.world)
        optimizer = torch.optim.AdamW(
            param_groups(model, cfg.optim.weight_decay),
            lr=self.lr,
            betas=(cfg.optim.beta1, cfg.optim.beta2),
            fused=cfg.optim.fused,
        )
        if cfg.train.compile:
            # compile() keeps the module and its parameters (state dicts stay unprefixed).
            model.compile()
        scheduler = warmup_cosine(
            optimizer, cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio
        )
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(cfg, self.n * self.k, self.bf16),
            mpu=TrainerMPU(groups),
            dist_init_required=False,
        )
        if self.world == 1 and cfg.train.zero_stage == 0:
            # One trainer has no gradients to average: skip the engine's bucketed all-reduce
            # (a flatten, a collective over one rank and an unflatten every step). ZeRO-1
            # needs it: its reduce fills the optimizer's gradient partitions.
            self.engine.enable_backward_allreduce = False
        self.step = 0
        # When the last checkpoint was written, or fit() began (train.checkpoint_every_minutes).
        self._saved_at = time.monotonic()
        self.losses: list[float] = []
        # (step, global mean loss on the device) not yet read back: see _flush_losses.
        self._pending: list[tuple[int, torch.Tensor]] = []
        # Caption ids of every batch, in group order (train.audit).
        self.audit_batches: list[list[int]] = []
        # The generated groups of each batch as (caption id, epoch, producer rank).
        self.audit_batch_keys: list[list[tuple[int, int, int]]] = []
        # Views trained and images received at the previous log step (implied reuse).
        self._balance0: tuple[int, int] | None = None
        self.advisor = BalanceAdvisor()
        if self.rank == 0:
            self.sink.layout(custom_scalars_layout())

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

    def _write_audit(self) -> None:
        buffer = self.source.buffer
        stats = buffer.stats()
        audit = {
            "rank": self.rank,
            "batches": self.audit_batches,
            "batch_keys": self.audit_batch_keys,
            "views_per_caption": self.k,
            "max_reuse": buffer.max_reuse,
            "uses": [[*key, uses] for key, uses in (buffer.uses_by_key or {}).items()],
            "held_unused": stats["unused"],
            "min_pool": buffer.min_pool,
            # How well batches mixed: mean fraction repeated from the previous batch, mean
            # steps between a retired group's first and last use.
            "batch_overlap": stats["batch_overlap"],
            "use_spread_steps": stats["use_spread_steps"],
            "counters": buffer.counters(),
        }
        path = Path(self.cfg.output_dir) / "audit" / f"trainer_rank{self.rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(audit))

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

    def _log(self, terms: dict[str, torch.Tensor], loss: float, t0: float, idle0: float,
             steps: int) -> None:
        elapsed = max(time.perf_counter() - t0, 1e-9)
        images_per_s = steps * self.n * self.k * self.world / elapsed
        idle = (self.source.idle_seconds() - idle0) / elapsed
        values = {
            "train/loss": loss,
            "train/lr": self.engine.lr_scheduler.get_last_lr()[0],
            "train/images_per_s": images_per_s,
            "train/idle_fraction": min(1.0, idle),
        }
        values.update({f"train/{k}": float(v.detach()) for k, v in terms.items() if k != "loss"})
        values.update({f"buffer/{k}": v for k, v in self.source.buffer.stats().items()})
        values.update(self.source.metrics())
        counters = self.source.buffer.counters()
        trained, received = self.step * self.n * self.k, counters["images_added"]
        if self._balance0 is not None and received > self._balance0[1]:
            # Views each image received since the last log served: what the balance implies.
            values["balance/implied_reuse"] = (
                (trained - self._balance0[0]) / (received - self._balance0[1]))
        self._balance0 = (trained, received)
        advice = self.advisor.observe(values["train/idle_fraction"], values.get("gen/idle_fraction"))
        if self.rank == 0:
            self.sink.scalars(values, self.step)
            console(
                f"step {self.step}/{self.cfg.train.steps} loss {loss:.4f} "
                f"lr {values['train/lr']:.2e} {images_per_s:.1f} img/s "
                f"idle {values['train/idle_fraction']:.0%} "
                f"buffer {values['buffer/groups']:.0f} reuse {values['buffer/mean_reuse']:.2f} "
                f"overlap {values['buffer/batch_overlap']:.0%} "
                f"spread {values['buffer/use_spread_steps']:.1f} steps",
                rank=self.global_rank,
            )
            if self.compare is not None:
                console(self.compare(values), rank=self.global_rank)
            if advice:
                console(advice, rank=self.global_rank)

    def _grid(self, batch: TrainBatch) -> None:
        """The newest groups received, each a row of every image its generator made, with
        caption, caption id, guidance and epoch."""
        groups = self.source.buffer.newest(4)
        if not groups:
            return
        grid = render_grid(groups, title=f"newest groups received at step {self.step}", cell=96)
        image = torch.from_numpy(np.asarray(grid)).permute(2, 0, 1).contiguous()
        self.sink.image("buffer/received_groups", image, self.step)

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
            self.step += 1
            steps_since += 1
            self._pending.append((self.step, mean_loss))
            if cfg.audit:
                self.audit_batches.append(batch.caption_ids[: batch.captions_per_batch].tolist())
                self.audit_batch_keys.append(list(self.source.buffer.last_batch_keys))
            # 4. Monitoring and checkpoints.
            if self.step % cfg.log_every == 0 or self.step == end:
                self._flush_losses()
                self._log(terms, self.losses[-1], t0, idle0, steps_since)
                t0, idle0, steps_since = time.perf_counter(), self.source.idle_seconds(), 0
            if self.rank == 0 and cfg.image_grid_every and self.step % cfg.image_grid_every == 0:
                self._grid(batch)
            if due or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
                self._flush_losses()
                last_ckpt = self.save()
        self._flush_losses()
        if last_ckpt is None or not last_ckpt.name.endswith(f"{self.step:08d}"):
            last_ckpt = self.save()
        if cfg.audit:
            self._write_audit()
        self.sink.flush()
        return TrainResult(self.step, list(self.losses), stopped, last_ckpt)
