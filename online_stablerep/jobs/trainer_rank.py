"""The trainer rank of the job: its batch source (colocated producer or generator ranks, with
real images mixed in), the Trainer with its sink and plan comparison, and what it leaves when it
finishes (train_summary.json, the HParams row, the probe)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch

from online_stablerep import atomic
from online_stablerep.config import Config
from online_stablerep.config.validate import real_groups_per_batch, resolved_min_pool
from online_stablerep.distributed.env import local_world_size
from online_stablerep.distributed.groups import JobGroups
from online_stablerep.distributed.roles import Roles
from online_stablerep.jobs.shutdown import StopRequest
from online_stablerep.monitoring.metrics import (
    MetricSink,
    TensorBoardSink,
    console,
    flat_hparams,
)
from online_stablerep.producers import build_producer
from online_stablerep.replay import ReplayBuffer
from online_stablerep.training.sources import BatchSource, ColocatedSource
from online_stablerep.training.trainer import Trainer, TrainResult


def trainer_source(
    cfg: Config, roles: Roles, groups: JobGroups, rank: int, device: torch.device,
    stop: StopRequest | None = None,
) -> BatchSource:
    """This trainer rank's batches: a replay buffer filled by its own producer (colocated) or by
    the generator ranks (hybrid), with `mix.real_fraction` of each batch from real images."""
    buffer = ReplayBuffer(cfg.replay.capacity, cfg.replay.max_reuse,
                          min_pool=resolved_min_pool(cfg), fresh_weight=cfg.replay.fresh_weight,
                          seed=cfg.seed * 7919 + rank, track_keys=cfg.train.audit,
                          draw=cfg.replay.draw, positives=cfg.batch.positives)
    k, r = cfg.batch.views_per_caption, real_groups_per_batch(cfg)
    # With real images mixed in, the producers fill the rest of each batch.
    n = cfg.batch.captions_per_batch - r
    if roles.colocated:
        shard, shards = roles.producer_shard(rank)
        producer = build_producer(cfg, shard, shards, rank, device)
        producer.start()
        source: BatchSource = ColocatedSource(producer, buffer, n, k)
    else:
        from online_stablerep.training.hybrid_source import build_hybrid_source

        source = build_hybrid_source(cfg, groups, buffer, stop, n)
    if cfg.mix.real_fraction == 0:
        return source
    from online_stablerep.training.mixed_source import MixedSource
    from online_stablerep.training.real_images import RealImageStream

    trainers = roles.trainer_ranks
    real = RealImageStream(cfg.mix.real_path, cfg.mix.caption_template,
                           cfg.producer.output_size, trainers.index(rank), len(trainers), cfg.seed,
                           skip_bad=cfg.mix.skip_bad_samples, rank=rank)
    if cfg.mix.prefetch_batches:
        from online_stablerep.training.real_prefetch import PrefetchedRealImages

        real = PrefetchedRealImages(real, r, cfg.mix.prefetch_batches)
    return MixedSource(source, real, r, k)


def plan_comparison(cfg: Config, roles: Roles) -> Callable[[dict[str, float]], str] | None:
    """A function that says how far logged figures are from `plan.*`, or None without a plan."""
    if not cfg.plan.gen_images_per_s:
        return None
    from online_stablerep.planning.planner import plan_deviation, plan_split

    local = local_world_size(roles.world_size)
    label = "measured" if cfg.plan.source == "measured" else "ESTIMATED"
    plan = plan_split(
        cfg.plan.gen_images_per_s, cfg.plan.train_images_per_s, local,
        max(1, roles.world_size // local), cfg.batch.captions_per_batch,
        cfg.batch.views_per_caption, cfg.producer.images_per_caption,
        reuse_budget=float(cfg.replay.max_reuse), gen_source=label, train_source=label,
    )

    def compare(values: dict[str, float]) -> str:
        try:
            return plan_deviation(plan, values, roles_spec=cfg.roles.generators)
        except ValueError:
            return plan_deviation(plan, values)

    return compare


def run_trainer(
    cfg: Config, roles: Roles, groups: JobGroups, device: torch.device, stop: StopRequest
) -> int:
    """Train on this rank until the schedule or the stream ends; rank 0 then writes the
    summary, probes the encoder (eval.probe_at_end) and records the HParams row."""
    rank = groups.rank
    source = trainer_source(cfg, roles, groups, rank, device, stop)
    sink: MetricSink = MetricSink()
    if rank == 0:
        sink = TensorBoardSink(Path(cfg.output_dir) / "tensorboard" / "train")
    try:
        trainer = Trainer(cfg, groups, source, device, sink, plan_comparison(cfg, roles), stop)
        if cfg.resume and not trainer.resume():
            console("resume=true but no complete checkpoint yet: starting fresh", rank=rank)
        result = trainer.fit()
    except BaseException as err:
        # Tell generator ranks why, so they exit non-zero instead of seeing a clean stop.
        abort = getattr(source, "abort", None)
        if abort is not None:
            abort(f"trainer rank {rank} failed: {err}")
        raise
    finally:
        source.close()
        sink.close()
    # The generators are released before the probe, which needs only the trained model.
    if rank == 0:
        _write_summary(cfg, result)
        console(f"finished: {result.steps} steps ({result.stopped_because}), "
                f"checkpoint {result.checkpoint}", rank=rank)
        probe = {}
        if cfg.eval.probe_at_end and not stop.is_set():
            from online_stablerep.eval.run import probe_after_training

            probe = probe_after_training(cfg, trainer.engine.module, device)
        _write_hparams(cfg, result, probe)
    return 0


def _write_hparams(cfg: Config, result: TrainResult, probe: dict) -> None:
    """The run's config beside its final figures in TensorBoard's HParams tab, so runs of an
    experiment (reuse, guidance, recipes) compare side by side."""
    metrics = {"final/loss": result.losses[-1] if result.losses else float("nan"),
               "final/steps": float(result.steps)}
    metrics.update({f"final/{key}": float(value) for key, value in probe.items()
                    if isinstance(value, float)})
    sink = TensorBoardSink(Path(cfg.output_dir) / "tensorboard" / "train")
    sink.hparams(flat_hparams(dataclasses.asdict(cfg)), metrics)
    sink.close()


def _write_summary(cfg: Config, result: TrainResult) -> None:
    summary = {
        "steps": result.steps,
        "stopped_because": result.stopped_because,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "first_loss": result.losses[0] if result.losses else None,
        "last_loss": result.losses[-1] if result.losses else None,
        "losses": result.losses,
    }
    atomic.write_text(Path(cfg.output_dir) / "train_summary.json", json.dumps(summary, indent=2))
