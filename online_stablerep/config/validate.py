"""Validation of a whole config in one place; every error names its key."""

from __future__ import annotations

import math
from pathlib import Path

from online_stablerep.config.recipes import RECIPES
from online_stablerep.config.schema import Config

GUIDANCE_PRESETS: dict[str, list[float]] = {
    "small": [2.0, 3.0],
    "large": [8.0, 10.0],
    "mixed": [2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0],
}
SCHEDULERS = ("dpm++", "unipc", "euler", "ddim", "lcm", "tcd")
TIMESTEP_SPACINGS = ("", "leading", "trailing", "linspace")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
RANDOM_ARCHITECTURES = ("tiny", "sd15", "sd21", "sdxl")
PRODUCERS = ("procedural", "diffusion", "shards")
IMAGE_FORMATS = ("png", "jpg", "webp")
# How the replay buffer draws a batch (replay.draw).
REPLAY_DRAWS = ("random", "sequential")
# What a group's k views are: k distinct images ("caption") or k copies of one image ("image",
# SimCLR), which the trainer's per-view augmentation turns into k different views.
BATCH_POSITIVES = ("caption", "image")
# The named transfer suites of eval/suites.py (kept here so that config need not import eval;
# tests/test_eval_suites.py checks the two lists agree).
EVAL_SUITES = ("procedural100",)


class ConfigError(ValueError):
    """A config key holds a value that cannot work."""


def parse_guidance(spec: str) -> list[float]:
    """Guidance scales from a preset name, a comma-separated list, or one value."""
    spec = str(spec).strip()
    if spec in GUIDANCE_PRESETS:
        return list(GUIDANCE_PRESETS[spec])
    try:
        values = [float(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(
            f"generator.guidance={spec!r}: expected small, large, mixed, a number or a "
            "comma-separated list of numbers"
        ) from None
    if not values:
        raise ConfigError("generator.guidance is empty")
    return values


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _one_of(value: object, key: str, allowed: tuple) -> None:
    _require(value in allowed, key, f"{value!r} is not one of {', '.join(map(str, allowed))}")


def validate(cfg: Config) -> None:
    """Raise ConfigError naming the first key whose value cannot work."""
    m, b, o, t, p, g = cfg.model, cfg.batch, cfg.optim, cfg.train, cfg.producer, cfg.generator
    _require(bool(cfg.output_dir), "output_dir", "must not be empty")
    _require(m.image_size > 0, "model.image_size", "must be positive")
    _one_of(m.head, "model.head", ("mlp_bn", "mlp_ln"))
    _require(m.embed_dim > 0 and m.head_hidden_dim > 0, "model.embed_dim", "must be positive")
    _require(0.0 <= m.drop_path_rate < 1.0, "model.drop_path_rate", "must be in [0, 1)")
    _require(m.text_heads >= 1 and m.text_width % m.text_heads == 0, "model.text_width",
             f"{m.text_width} is not a multiple of model.text_heads={m.text_heads}")
    _one_of(m.text_activation, "model.text_activation", ("quick_gelu", "gelu"))
    _require(m.image_text_dim > 0, "model.image_text_dim", "must be positive")
    _require(cfg.loss.temperature > 0, "loss.temperature", f"must be > 0, got {cfg.loss.temperature}")
    _require(cfg.loss.image_weight >= 0, "loss.image_weight", "must be >= 0")
    _require(cfg.loss.text_weight >= 0, "loss.text_weight", "must be >= 0")

    a = cfg.augment
    _require(0 < a.crop_scale_min <= a.crop_scale_max <= 1, "augment.crop_scale_min",
             "need 0 < crop_scale_min <= crop_scale_max <= 1")
    for key in ("color_jitter_p", "grayscale_p", "blur_p", "flip_p", "downsample_p"):
        value = getattr(a, key)
        _require(0.0 <= value <= 1.0, f"augment.{key}", f"probability {value} not in [0, 1]")
    _require(0 <= a.hue <= 0.5, "augment.hue", "must be in [0, 0.5]")
    _require(len(a.downsample_sizes) > 0 and all(s >= 1 for s in a.downsample_sizes),
             "augment.downsample_sizes", "must list sizes >= 1")
    _require(0 < a.blur_sigma_min <= a.blur_sigma_max, "augment.blur_sigma_min",
             "need 0 < blur_sigma_min <= blur_sigma_max")
    _require(len(a.mean) == 3 and len(a.std) == 3, "augment.mean", "mean and std need 3 values")
    _require(all(s > 0 for s in a.std), "augment.std", "must be positive")

    _require(b.captions_per_batch >= 1, "batch.captions_per_batch", "must be >= 1")
    _require(b.views_per_caption >= 2, "batch.views_per_caption",
             f"need at least 2 views per caption for positives, got {b.views_per_caption}")
    _one_of(b.positives, "batch.positives", BATCH_POSITIVES)
    # SimCLR positives need one image per group; multi-positive ones k distinct images.
    least = 1 if b.positives == "image" else 2
    _require(p.images_per_caption >= least, "producer.images_per_caption",
             f"need at least {least} images per caption, got {p.images_per_caption}")
    # Stored groups (producer.kind=shards) bring their own image count, checked as read.
    _require(p.kind == "shards" or b.positives == "image"
             or b.views_per_caption <= p.images_per_caption,
             "batch.views_per_caption",
             f"{b.views_per_caption} views > producer.images_per_caption={p.images_per_caption}")
    _require(b.captions_per_batch * b.views_per_caption >= 2, "batch.captions_per_batch",
             "a batch needs at least 2 rows")

    _require(o.base_lr > 0 or o.lr > 0, "optim.base_lr", "one of base_lr, lr must be > 0")
    _require(o.lr >= 0, "optim.lr", "must be >= 0")
    _require(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1", "betas must be in [0, 1)")
    _require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    _require(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0")

    _require(t.steps >= 0, "train.steps", "must be >= 0 (0 = from train.schedule_epochs)")
    _require(t.steps > 0 or t.schedule_epochs > 0, "train.schedule_epochs",
             "must be > 0 when train.steps is 0 (the schedule comes from one of them)")
    _require(t.schedule_epochs >= 0, "train.schedule_epochs", "must be >= 0")
    _require(0 <= t.warmup_epochs and (t.schedule_epochs == 0
                                       or t.warmup_epochs <= t.schedule_epochs),
             "train.warmup_epochs",
             f"{t.warmup_epochs} not in [0, train.schedule_epochs={t.schedule_epochs}]")
    _require(t.epochs >= 0, "train.epochs", "must be >= 0")
    _require(t.stop_after >= 0, "train.stop_after", "must be >= 0")
    _one_of(t.precision, "train.precision", ("auto", "bf16", "autocast_bf16", "fp32"))
    _one_of(t.zero_stage, "train.zero_stage", (0, 1))
    _require(t.log_every >= 1, "train.log_every", "must be >= 1")
    _require(t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
    _require(t.checkpoint_every_minutes >= 0, "train.checkpoint_every_minutes", "must be >= 0")
    _require(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    _require(t.image_grid_every >= 0, "train.image_grid_every", "must be >= 0")
    _one_of(t.on_nonfinite, "train.on_nonfinite", ("stop", "skip"))
    _require(t.cpu_threads >= 0, "train.cpu_threads", "must be >= 0")

    _one_of(p.kind, "producer.kind", PRODUCERS)
    _require(p.output_size >= 8, "producer.output_size", "must be >= 8")
    _require(p.captions_per_call >= 1, "producer.captions_per_call", "must be >= 1")
    _require(p.seed >= 0, "producer.seed", "must be >= 0")

    _validate_shards(cfg)

    q = cfg.procedural
    _require(q.num_categories >= 2, "procedural.num_categories", "must be >= 2")
    _require(q.render_size >= 8, "procedural.render_size", "must be >= 8")
    _require(q.num_points >= 100, "procedural.num_points", "must be >= 100")
    _require(2 <= q.num_maps <= 8, "procedural.num_maps", "must be in [2, 8]")

    _require(bool(g.model), "generator.model", "must name a checkpoint or an architecture")
    _one_of(g.scheduler, "generator.scheduler", SCHEDULERS)
    _require(g.steps >= 1, "generator.steps", "must be >= 1")
    parse_guidance(g.guidance)
    _require(g.resolution >= 0 and g.resolution % 8 == 0, "generator.resolution",
             "must be 0 or a positive multiple of 8")
    _one_of(g.dtype, "generator.dtype", ("auto", "bf16", "fp16", "fp32"))
    _one_of(g.attention, "generator.attention", ("sdpa", "xformers"))
    _require(g.vae_decode_chunk >= 0, "generator.vae_decode_chunk", "must be >= 0")
    _validate_levers(cfg)

    _require(cfg.replay.capacity >= b.captions_per_batch, "replay.capacity",
             f"{cfg.replay.capacity} < batch.captions_per_batch={b.captions_per_batch}")
    _require(cfg.replay.max_reuse >= 1, "replay.max_reuse", "must be >= 1")
    _require(cfg.replay.min_pool >= 0, "replay.min_pool", "must be >= 0 (0 = auto)")
    _require(cfg.replay.fresh_weight > 0, "replay.fresh_weight", "must be > 0")
    _one_of(cfg.replay.draw, "replay.draw", REPLAY_DRAWS)
    pool = resolved_min_pool(cfg)
    _require(cfg.replay.capacity >= pool, "replay.capacity",
             f"{cfg.replay.capacity} < replay.min_pool={pool} (the pool a batch is drawn from; "
             "raise replay.capacity or lower replay.min_pool)")
    _require(cfg.transport.credits_per_generator >= 1, "transport.credits_per_generator",
             "must be >= 1")
    _require(cfg.transport.timeout_s > 0, "transport.timeout_s", "must be > 0")
    _require(cfg.transport.startup_timeout_s >= cfg.transport.timeout_s,
             "transport.startup_timeout_s",
             f"{cfg.transport.startup_timeout_s} < transport.timeout_s={cfg.transport.timeout_s}")
    _require(cfg.transport.collective_timeout_s > 0, "transport.collective_timeout_s",
             "must be > 0")
    parse_generators(cfg.roles.generators)
    _one_of(cfg.roles.on_generator_loss, "roles.on_generator_loss", ("stop", "continue"))
    _require(0 < cfg.roles.max_idle_after_loss <= 1, "roles.max_idle_after_loss",
             "must be in (0, 1]")

    _require(cfg.plan.gen_images_per_s >= 0 and cfg.plan.train_images_per_s >= 0,
             "plan.gen_images_per_s", "rates must be >= 0")
    _require((cfg.plan.gen_images_per_s > 0) == (cfg.plan.train_images_per_s > 0),
             "plan.train_images_per_s", "give both plan rates or neither")
    _one_of(cfg.plan.source, "plan.source", ("measured", "estimated"))

    e = cfg.eval
    _require(e.train_per_class >= 1 and e.test_per_class >= 1, "eval.train_per_class",
             "must be >= 1")
    _require(len(e.lrs) >= 1 and all(x > 0 for x in e.lrs), "eval.lrs", "need positive values")
    _require(all(x >= 0 for x in e.weight_decays), "eval.weight_decays", "must be >= 0")
    _require(e.epochs >= 1, "eval.epochs", "must be >= 1")
    _require(e.knn_k >= 1, "eval.knn_k", "must be >= 1")
    _require(e.suite == "" or e.suite in EVAL_SUITES, "eval.suite",
             f"{e.suite!r} is not one of {', '.join(EVAL_SUITES)} (or \"\" for eval.dataset)")
    _validate_mix(cfg)


def real_groups_per_batch(cfg: Config) -> int:
    """Caption groups of each batch that are real images: mix.real_fraction of n, rounded."""
    return round(cfg.mix.real_fraction * cfg.batch.captions_per_batch)


def _validate_mix(cfg: Config) -> None:
    mix, n = cfg.mix, cfg.batch.captions_per_batch
    _require(0.0 <= mix.real_fraction < 1.0, "mix.real_fraction",
             f"{mix.real_fraction} not in [0, 1) (some of each batch must be generated)")
    _require(mix.prefetch_batches >= 0, "mix.prefetch_batches",
             f"{mix.prefetch_batches} is negative (0 decodes on the trainer's thread)")
    if mix.real_fraction == 0:
        return
    _require(bool(mix.real_path), "mix.real_path",
             "must name an ImageFolder root or WebDataset shards when mix.real_fraction > 0")
    real = real_groups_per_batch(cfg)
    _require(1 <= real < n, "mix.real_fraction",
             f"{mix.real_fraction} of batch.captions_per_batch={n} rounds to {real} real "
             f"groups: need between 1 and {n - 1}")
    _require("{}" in mix.caption_template, "mix.caption_template",
             f"{mix.caption_template!r} has no {{}} for the folder name")


def _local_path_missing(value: str) -> bool:
    """True for a value that can only be a local path (absolute, relative with ./ or ~, or a
    weights file name) and does not exist; anything else may be a hub id, checked at load."""
    looks_local = value.startswith(("/", "./", "../", "~")) or value.endswith(
        (".safetensors", ".bin", ".pt"))
    return looks_local and not Path(value).expanduser().exists()


def _validate_levers(cfg: Config) -> None:
    """The speed levers of the generator (config/recipes.py)."""
    g = cfg.generator
    _one_of(g.recipe, "generator.recipe", ("", *RECIPES))
    _one_of(g.timestep_spacing, "generator.timestep_spacing", TIMESTEP_SPACINGS)
    _require(0.0 <= g.tcd_eta <= 1.0, "generator.tcd_eta", f"{g.tcd_eta} not in [0, 1]")
    _require(0.0 <= g.ddim_eta <= 1.0, "generator.ddim_eta", f"{g.ddim_eta} not in [0, 1]")
    _require(g.ddim_eta == 0.0 or g.scheduler == "ddim", "generator.ddim_eta",
             f"{g.ddim_eta} would be ignored: generator.scheduler is {g.scheduler!r}, not ddim")
    _one_of(g.compile_mode, "generator.compile_mode", COMPILE_MODES)
    _require(math.isfinite(g.lora_scale) and g.lora_scale != 0, "generator.lora_scale",
             "must be a finite non-zero number")
    for key in ("lora", "unet", "tiny_vae"):
        value = getattr(g, key)
        _require(not _local_path_missing(value), f"generator.{key}",
                 f"{value!r}: no such file or directory")
    _require(not g.lora_weight_name or bool(g.lora), "generator.lora_weight_name",
             "given without generator.lora")
    _require(0 <= g.base_steps <= g.steps, "generator.base_steps",
             f"{g.base_steps} not in [0, generator.steps={g.steps}]")
    _require(g.base_steps == 0 or bool(g.lora or g.unet), "generator.base_steps",
             f"{g.base_steps} base steps need a distilled model to hand over to "
             "(generator.lora or generator.unet)")
    interval = list(g.guidance_interval)
    _require(len(interval) == 2 and 0.0 <= interval[0] <= interval[1] <= 1.0,
             "generator.guidance_interval", f"{interval}: need [lo, hi] with 0 <= lo <= hi <= 1")
    _require(g.deep_cache_every >= 1, "generator.deep_cache_every", "must be >= 1 (1 = off)")
    _require(not (g.scheduler in ("lcm", "tcd") and g.timestep_spacing),
             "generator.timestep_spacing", f"{g.timestep_spacing!r} would be ignored: the "
             f"{g.scheduler} scheduler picks its own timesteps (leave it empty)")


def _validate_shards(cfg: Config) -> None:
    """Writing caption groups to shards (shards.write_dir) and training from them (shards.path)."""
    x = cfg.shards
    _one_of(x.image_format, "shards.image_format", IMAGE_FORMATS)
    _require(1 <= x.quality <= 100, "shards.quality", f"{x.quality} not in [1, 100]")
    _require(x.groups_per_shard >= 1, "shards.groups_per_shard", "must be >= 1")
    _require(x.queue_groups >= 1, "shards.queue_groups", "must be >= 1")
    if cfg.producer.kind == "shards":
        _require(bool(cfg.shards.path), "shards.path",
                 "producer.kind=shards needs a folder or glob of .tar shards")
        _require(not x.write_dir, "shards.write_dir",
                 "producer.kind=shards reads stored groups: writing them out again is not "
                 "supported (leave shards.write_dir empty)")


def parse_generators(spec: str) -> tuple[int, bool]:
    """`roles.generators` as (count, per_node): "2" -> (2, False), "1/node" -> (1, True)."""
    text = str(spec).strip()
    per_node = text.endswith("/node")
    number = text[: -len("/node")] if per_node else text
    try:
        count = int(number)
    except ValueError:
        raise ConfigError(
            f"roles.generators={spec!r}: expected a count like 2 or a count per node like 1/node"
        ) from None
    _require(count >= 0, "roles.generators", f"must be >= 0, got {count}")
    return count, per_node


def resolved_min_pool(cfg: Config) -> int:
    """`replay.min_pool`, with 0 (auto) sized from captions_per_batch n and max_reuse.

    Uniform draws of n groups from a pool of P repeat about n / P of the previous batch and
    spread a group's R uses over about R * P / n steps. 4n keeps the repeat near a quarter
    (the official offline run reshuffles whole epochs, repeat ~0); with max_reuse 1 no group
    can repeat, so a larger pool would only add latency.
    """
    n, r = cfg.batch.captions_per_batch, cfg.replay
    if r.min_pool > 0:
        return max(r.min_pool, n)
    return n if r.max_reuse <= 1 or r.draw == "sequential" else 4 * n
