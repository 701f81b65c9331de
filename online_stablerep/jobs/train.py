"""The training job: one process per rank, started by the deepspeed launcher (or alone).

Every rank validates its input, joins torch.distributed, creates all process groups in the same
order, then takes its role: trainer ranks run the Trainer, generator ranks feed them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from online_stablerep.config import Config, ConfigError, save_config
from online_stablerep.config.inputs import InputError, check_inputs
from online_stablerep.config.validate import real_groups_per_batch, resolved_min_pool
from online_stablerep.distributed.env import default_device, local_world_size
from online_stablerep.distributed.groups import JobGroups, create_groups, init_with_deepspeed
from online_stablerep.distributed.roles import Roles
from online_stablerep.distributed.startup import StartupError, agree_on_startup, several_nodes
from online_stablerep.jobs.shutdown import StopRequest, write_last_word
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
from online_stablerep.transport.messages import TransportError, describe_failure


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def single_process_env() -> None:
    """Let `online-stablerep train` run without a launcher as a world of one rank."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if "LOCAL_SIZE" not in os.environ:  # the deepspeed launcher's ranks-per-node
        os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _pin_cpu_cores() -> None:
    """On CPU launches, give each local rank its own share of the cores so ranks do not fight
    over them (launch/train.sh sets ONLINE_STABLEREP_PIN_CORES=1)."""
    local_world = local_world_size()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cores = sorted(os.sched_getaffinity(0))
    share = max(1, len(cores) // local_world)
    mine = cores[(local * share) % len(cores):][:share]
    os.sched_setaffinity(0, mine)
    torch.set_num_threads(len(mine))


# Sockets a rank holds per peer: one gloo pair for each of the world-wide gloo groups (default,
# data plane, control) and the trainer group on CPU (benchmarks/scale_model.py measured 3.95).
SOCKETS_PER_PEER = 4


def _raise_open_files_limit(world: int, rank: int) -> None:
    """Gloo connects every pair of ranks of a group: at 1,000 ranks a rank holds about 4,000
    sockets, past the usual soft limit of 1,024 open files. Raise the soft limit to the hard
    one when the job needs more, and say so when even that is too low."""
    import resource

    need = SOCKETS_PER_PEER * world + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    top = need if hard == resource.RLIM_INFINITY else min(hard, need)
    resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))
    if top < need and rank == 0:
        console(f"warning: a job of {world} ranks needs about {need} open files per rank "
                f"(gloo's sockets) but the hard limit is {hard}: raise it (ulimit -n) or "
                "group creation fails with 'Too many open files'", rank=rank)


def _trainer_source(
    cfg: Config, roles: Roles, groups: JobGroups, rank: int, device: torch.device,
    stop: StopRequest | None = None,
) -> BatchSource:
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
                           skip_bad=cfg.mix.skip_bad_samples)
    if cfg.mix.prefetch_batches:
        from online_stablerep.training.real_prefetch import PrefetchedRealImages

        real = PrefetchedRealImages(real, r, cfg.mix.prefetch_batches)
    return MixedSource(source, real, r, k)


def _plan_comparison(cfg: Config, roles: Roles) -> Callable[[dict[str, float]], str] | None:
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


def _run_trainer(
    cfg: Config, roles: Roles, groups: JobGroups, device: torch.device, stop: StopRequest
) -> int:
    rank = groups.rank
    source = _trainer_source(cfg, roles, groups, rank, device, stop)
    sink: MetricSink = MetricSink()
    if rank == 0:
        sink = TensorBoardSink(Path(cfg.output_dir) / "tensorboard" / "train")
    try:
        trainer = Trainer(cfg, groups, source, device, sink, _plan_comparison(cfg, roles), stop)
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
    (Path(cfg.output_dir) / "train_summary.json").write_text(json.dumps(summary, indent=2))


def _run_generator(
    cfg: Config, roles: Roles, groups: JobGroups, device: torch.device, stop: StopRequest
) -> int:
    from online_stablerep.jobs.generator import run_generator

    rank = groups.rank
    shard, shards = roles.producer_shard(rank)
    return run_generator(cfg, groups, lambda: build_producer(cfg, shard, shards, rank, device),
                         stop)


def _role_name(cfg: Config, rank: int, world: int, local: int) -> str:
    """"trainer" or "generator" for last words and console lines ("unknown": a bad layout)."""
    try:
        roles = Roles.from_spec(cfg.roles.generators, world, local)
    except ConfigError:
        return "unknown"
    return "trainer" if roles.is_trainer(rank) else "generator"


def _failure(err: BaseException) -> tuple[str, str, bool]:
    """(reason, cause, traceback wanted): errors about input, the disk or a peer are reported in
    one line; a traceback is for bugs."""
    from online_stablerep.shards.format import ShardError
    from online_stablerep.shards.writer import SpillError
    from online_stablerep.training.checkpoint import CheckpointError
    from online_stablerep.training.real_images import RealImageError
    from online_stablerep.training.trainer import NonFiniteLossError

    text = f"{err}" if isinstance(err, (SystemExit, KeyboardInterrupt)) else (
        f"{type(err).__name__}: {err}")
    if isinstance(err, TransportError):
        return str(err), "peer", False
    if isinstance(err, StartupError):
        return str(err), "own" if err.own else "peer", False
    described = describe_failure(err)
    if described.startswith(("connection closed", "stopped answering")):
        return f"{type(err).__name__}: {described}", "peer", False
    clean = (ConfigError, CheckpointError, NonFiniteLossError, ShardError, SpillError,
             RealImageError, SystemExit, KeyboardInterrupt)
    return text, "own", not isinstance(err, clean)


def run_job(cfg: Config) -> int:
    """Run this rank's part of the job; returns the process exit code.

    Past the input check, every way out leaves a last word in `output_dir/ranks/rank{N}.json`
    (jobs/shutdown.py), and SIGTERM/SIGINT ask the rank to stop at its next step.

    Raises:
        InputError: bad input, before any process group or model exists (the CLI exits 2).
            On several nodes bad input instead fails every rank after the rendezvous, each
            with a last word naming the rank that failed (exit code 2).
    """
    single_process_env()
    device = default_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if device.type == "cpu" and os.environ.get("ONLINE_STABLEREP_PIN_CORES") == "1":
        _pin_cpu_cores()
    if cfg.train.cpu_threads:
        torch.set_num_threads(cfg.train.cpu_threads)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = local_world_size(world)
    _raise_open_files_limit(world, rank)
    # 1. Everything that can fail on bad input fails here, before any group or model exists
    # (InputError: the CLI prints one line and exits 2). On several nodes the failure is held
    # until the rendezvous, so every node hears of it (distributed/startup.py).
    roles: Roles | None = None
    failure: str | None = None
    try:
        roles = check_inputs(cfg, world, local)
    except InputError as err:
        if not several_nodes(world, local):
            raise
        failure = f"input error: {err}"
    role = _role_name(cfg, rank, world, local)
    stop = StopRequest()
    stop.install(lambda name: console(
        f"received {name}: stopping at the next step (trainers save a checkpoint first)",
        role="train" if role == "trainer" else "generator", rank=rank))
    write_last_word(cfg.output_dir, rank, role, "running")
    try:
        # 2. torch.distributed first (no device_id), then DeepSpeed reuses it. Ranks start at
        # different speeds (imports on a loaded node): the rendezvous has the start-up budget.
        init_with_deepspeed(device, cfg.transport.startup_timeout_s)
        if several_nodes(world, local):
            agree_on_startup(failure, local)
        assert roles is not None
        groups = create_groups(roles, device, cfg.transport.timeout_s)
        if rank == 0:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            save_config(cfg, Path(cfg.output_dir) / "config.yaml")
            console(roles.describe(), rank=rank)
        if roles.is_trainer(rank):
            code = _run_trainer(cfg, roles, groups, device, stop)
        else:
            code = _run_generator(cfg, roles, groups, device, stop)
        if stop.is_set():
            write_last_word(cfg.output_dir, rank, role, "stopped",
                            f"{stop.signal_name} received by rank {rank} ({role})",
                            code=stop.exit_code)
            return stop.exit_code
        write_last_word(cfg.output_dir, rank, role, "finished", code=code)
        return code
    except BaseException as err:
        reason, cause, want_traceback = _failure(err)
        code = 2 if isinstance(err, StartupError) else 1
        print(f"[{role} rank {rank}] failed: {reason}", file=sys.stderr, flush=True)
        if want_traceback:
            traceback.print_exc()
        write_last_word(cfg.output_dir, rank, role, "failed", reason, cause, code=code)
        return code
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
