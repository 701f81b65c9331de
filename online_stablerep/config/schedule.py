"""The training schedule in the official units: passes over the caption corpus.

The official code trains `--epochs` passes over its caption corpus with a warm-up of
`--warmup_epochs` passes, so its step count follows the corpus size, the GPU count and the batch:
a pass is `ceil(corpus / ranks) // n` steps (a DistributedSampler pads the corpus to a multiple
of the ranks, each rank's loader drops its last partial batch). The same 15 passes are 109k
steps on 32 ranks and ~10M captions, 436k on 8 ranks, 29k on CC3M's 2.7M captions at 32 ranks.
Here the schedule is resolved the same way at start, from `train.schedule_epochs` and
`train.warmup_epochs`; an explicit `train.steps` (or `optim.warmup_steps`) wins.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from online_stablerep.config.schema import Config
from online_stablerep.config.validate import ConfigError, real_groups_per_batch


@dataclass(frozen=True)
class Schedule:
    """The resolved schedule of a run."""

    # Optimizer steps of the whole schedule.
    steps: int
    # Linear warm-up steps before the cosine decay.
    warmup_steps: int
    # Steps of one pass over the corpus (0: corpus unknown).
    steps_per_epoch: int
    # Caption groups of the corpus (0: unknown, e.g. stored shards).
    corpus: int
    # Trainer ranks the schedule was resolved for.
    trainers: int
    # Generated caption groups a step takes over all trainers (n minus real groups, x ranks).
    groups_per_step: int
    # Where the step count came from: "train.steps" or "train.schedule_epochs".
    steps_from: str
    # Where the warm-up came from: "optim.warmup_steps" or "train.warmup_epochs".
    warmup_from: str

    @property
    def epochs(self) -> float:
        """Passes over the corpus the schedule makes (0 when the corpus is unknown)."""
        return self.steps / self.steps_per_epoch if self.steps_per_epoch else 0.0

    def describe(self) -> str:
        """One console line: steps, warm-up, and both in corpus passes when known."""
        if self.steps_per_epoch:
            where = (f"{self.epochs:.2f} passes over {self.corpus:,} captions at "
                     f"{self.groups_per_step:,} groups a step ({self.trainers} trainer ranks), "
                     f"{self.steps_per_epoch:,} steps a pass")
        else:
            where = "corpus size unknown"
        return (f"schedule: {self.steps:,} steps from {self.steps_from}, warm-up "
                f"{self.warmup_steps:,} steps from {self.warmup_from} ({where})")

    def apply(self, cfg: Config) -> Config:
        """`cfg` with train.steps and optim.warmup_steps set to the resolved values (what the
        trainer runs and config.yaml records)."""
        return dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, steps=self.steps),
            optim=dataclasses.replace(cfg.optim, warmup_steps=self.warmup_steps))


def steps_per_epoch(corpus: int, trainers: int, groups_per_rank: int) -> int:
    """Steps of one pass over `corpus` captions, as the official loader counts them."""
    return math.ceil(corpus / trainers) // groups_per_rank


def resolve_schedule(cfg: Config, corpus: int, trainers: int) -> Schedule:
    """The schedule of `cfg` for a corpus of `corpus` caption groups (0 = unknown) and
    `trainers` trainer ranks.

    Steps: train.steps when > 0, else train.schedule_epochs passes over the corpus. Warm-up:
    optim.warmup_steps when > 0, else train.warmup_epochs passes; with an explicit train.steps
    the warm-up keeps its share of the schedule (warmup_epochs / schedule_epochs), so a short
    run still decays.

    Raises:
        ConfigError: naming train.steps when it must come from a corpus that is unknown or
            smaller than one global batch.
    """
    t, n = cfg.train, cfg.batch.captions_per_batch - real_groups_per_batch(cfg)
    per_epoch = steps_per_epoch(corpus, trainers, n) if corpus > 0 else 0
    if t.steps > 0:
        steps, steps_from = t.steps, "train.steps"
    elif corpus <= 0:
        raise ConfigError("train.steps=0 derives the schedule from the caption corpus, whose "
                          "size is unknown here (stored shards): give train.steps")
    elif per_epoch == 0:
        raise ConfigError(f"train.steps=0: {corpus} captions make no full step of {n} groups on "
                          f"each of {trainers} trainer ranks: give train.steps or use a larger "
                          "corpus")
    else:
        steps, steps_from = max(1, round(t.schedule_epochs * per_epoch)), "train.schedule_epochs"
    if cfg.optim.warmup_steps > 0:
        warmup, warmup_from = cfg.optim.warmup_steps, "optim.warmup_steps"
    elif t.steps == 0:
        warmup, warmup_from = round(t.warmup_epochs * per_epoch), "train.warmup_epochs"
    else:
        warmup = round(steps * t.warmup_epochs / t.schedule_epochs) if t.schedule_epochs else 0
        warmup_from = "train.warmup_epochs / train.schedule_epochs of train.steps"
    return Schedule(steps=steps, warmup_steps=min(warmup, steps), steps_per_epoch=per_epoch,
                    corpus=max(corpus, 0), trainers=trainers, groups_per_step=n * trainers,
                    steps_from=steps_from, warmup_from=warmup_from)


def uses_per_image(cfg: Config) -> float:
    """Uses of one stored image at replay.max_reuse group uses: each use of a group takes k of
    its m images (official 1x: 15 group uses x 6 / 10 = 9 per image)."""
    return cfg.replay.max_reuse * cfg.batch.views_per_caption / cfg.producer.images_per_caption


def reuse_line(cfg: Config, schedule: Schedule) -> str:
    """One console line: reuse per group and per image, and the generation it asks for."""
    k, m, reuse = cfg.batch.views_per_caption, cfg.producer.images_per_caption, cfg.replay.max_reuse
    draws = schedule.steps * schedule.groups_per_step
    line = (f"reuse: a group is used at most {reuse} times ({k} of its {m} images each), "
            f"{uses_per_image(cfg):.1f} uses per stored image (official 1x: 15 group uses, 9 "
            f"per image); the schedule draws {draws:,} groups, so producers make at least "
            f"{math.ceil(draws / reuse):,}")
    if schedule.corpus:
        line += f" ({draws / reuse / schedule.corpus:.2f} passes over the corpus)"
    return line
