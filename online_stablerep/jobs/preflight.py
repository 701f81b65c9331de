"""The job's preflight: checks of everything a config points at, run on every rank (and by
launch/train.sh) before any process group or model exists: the layout against the launched
world, the output and evaluation paths, the caption corpus, stored shards, real images, the
diffusion model folders and the backbone's input size.

Each failure is an InputError naming the key, file or value and what to do; the CLI prints it as
one line and exits 2. `validate()` (config/validate.py) checks values on their own and imports
nothing above the config; this module checks them against the world, the file system and the
parts the job will build, so it sits in the job layer beside what it checks.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from online_stablerep.config.schedule import Schedule, resolve_schedule
from online_stablerep.config.schema import CaptionsConfig, Config
from online_stablerep.config.validate import ConfigError
from online_stablerep.distributed.roles import Roles


class InputError(ConfigError):
    """An input the config points at cannot work (missing file, bad corpus, wrong layout)."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise InputError(message)


def _check_writable_folder(key: str, path: Path) -> None:
    """A folder the job creates or writes into: not a file, below a writable folder."""
    _require(not path.exists() or path.is_dir(),
             f"{key}={str(path)!r} is a file: give a directory (it is created if missing)")
    existing = path
    while not existing.exists():
        existing = existing.parent
    _require(existing.is_dir(), f"{key}={str(path)!r}: {existing} is a file, not a folder")
    _require(os.access(existing, os.W_OK),
             f"{key}={str(path)!r}: {existing} is not writable: choose another {key}")


def _check_backbone(cfg: Config) -> None:
    import timm

    from online_stablerep.models.encoder import build_backbone

    name, size = cfg.model.backbone, cfg.model.image_size
    _require(timm.is_model(name),
             f"model.backbone={name!r} is not a timm model name (see timm.list_models())")
    # On the meta device nothing is allocated: only the patch size is read. A model that cannot
    # be built there is checked when it is built for real.
    try:
        with torch.device("meta"):
            backbone = build_backbone(name, size, 0.0)
    except (RuntimeError, NotImplementedError, ValueError, TypeError):
        return
    patch = getattr(getattr(backbone, "patch_embed", None), "patch_size", None)
    if patch:
        p = int(patch[0]) if isinstance(patch, (tuple, list)) else int(patch)
        _require(size % p == 0,
                 f"model.image_size={size} is not a multiple of the patch size {p} of "
                 f"model.backbone={name!r} (the last {size % p} pixels would be cropped): use "
                 f"{size - size % p} or {size - size % p + p}")


def _looks_like_path(text: str) -> bool:
    """A hub id is "org/name"; anything else with a path shape is meant as a folder."""
    return text.startswith(("/", ".", "~")) or text.count("/") != 1


def _check_generator_model(cfg: Config) -> None:
    from online_stablerep.config.validate import RANDOM_ARCHITECTURES
    from online_stablerep.producers.shipped import SHIPPED_MODELS

    model = cfg.generator.model
    if model not in RANDOM_ARCHITECTURES:
        # A shipped model (e.g. "toy") is checked as the folder it names.
        folder = Path(SHIPPED_MODELS.get(model, model)).expanduser()
        if folder.exists():
            _require((folder / "model_index.json").is_file(),
                     f"generator.model={model!r}: not a diffusers folder (no model_index.json): "
                     "give the folder saved by save_pretrained, a hub id, or one of "
                     f"{', '.join(RANDOM_ARCHITECTURES)}")
        else:
            _require(not _looks_like_path(model),
                     f"generator.model={model!r}: no such folder: give a local diffusers folder, "
                     f"a hub id like org/name, or one of {', '.join(RANDOM_ARCHITECTURES)}")
    if cfg.generator.tiny_vae:
        _require(Path(cfg.generator.tiny_vae).is_dir(),
                 f"generator.tiny_vae={cfg.generator.tiny_vae!r}: no such folder (give an "
                 "AutoencoderTiny folder, or leave it empty)")


def _caption_count(captions: CaptionsConfig) -> int:
    # Indexing a corpus of millions of captions takes seconds: the checks and the schedule
    # share one count (keyed by the file's modification time too, so an edited file is
    # counted again).
    path = Path(captions.path).expanduser()
    stamp = path.stat().st_mtime_ns if captions.path and path.exists() else 0
    return _count(captions.path, captions.column, captions.skip_bad_rows, stamp)


@functools.lru_cache(maxsize=4)
def _count(path: str, column: str, skip_bad_rows: bool, stamp: int) -> int:
    from online_stablerep.producers.captions import CaptionSource

    try:
        return len(CaptionSource.open(CaptionsConfig(path=path, column=column,
                                                     skip_bad_rows=skip_bad_rows)))
    except ValueError as err:
        raise InputError(str(err)) from None


def corpus_groups(cfg: Config) -> int:
    """Caption groups of one pass over the corpus the producers draw from: the captions, the
    procedural categories, or 0 for stored shards (not counted: that reads every shard)."""
    if cfg.producer.kind == "diffusion":
        return _caption_count(cfg.captions)
    if cfg.producer.kind == "procedural":
        return cfg.procedural.num_categories
    return 0


def job_schedule(cfg: Config, roles: Roles) -> Schedule:
    """The run's schedule for its corpus and trainer ranks (config/schedule.py).

    Raises:
        InputError: naming train.steps when the schedule cannot come from the corpus.
    """
    try:
        return resolve_schedule(cfg, corpus_groups(cfg), roles.num_trainers)
    except InputError:
        raise
    except ConfigError as err:
        raise InputError(str(err)) from None


def _check_captions(cfg: Config, producers: int) -> None:
    count = _caption_count(cfg.captions)
    n = cfg.batch.captions_per_batch
    where = cfg.captions.path or "the demo captions"
    _require(count >= producers,
             f"captions.path={where!r}: {count} captions cannot be split across {producers} "
             "producers (each needs at least one): use a larger corpus or fewer generators")
    _require(count >= n,
             f"captions.path={where!r}: {count} captions, fewer than batch.captions_per_batch="
             f"{n} distinct captions a batch needs: use a larger corpus or a smaller batch")
    if not cfg.captions.shuffle:
        # Unshuffled, a shard holds the same captions every epoch; a colocated trainer draws
        # its batches from its own shard only.
        smallest = count // producers
        _require(producers == 1 or smallest >= n,
                 f"captions.shuffle=false: the smallest of {producers} shards of "
                 f"captions.path={where!r} holds {smallest} captions, fewer than "
                 f"batch.captions_per_batch={n}: set captions.shuffle=true, use a larger corpus "
                 "or a smaller batch")


def _check_shards(cfg: Config, producers: int) -> None:
    """The stored groups of producer.kind=shards: enough files, and each file's first sample
    readable (the rest is checked as it is read)."""
    from online_stablerep.producers.shards import shard_files
    from online_stablerep.shards.format import ShardError, decode_sample, iter_samples

    spec = cfg.shards.path
    files = shard_files(spec)
    _require(bool(files), f"shards.path={spec!r}: no .tar files there (give a folder of shards "
             "written with shards.write_dir, or a glob like dir/*.tar)")
    _require(len(files) >= producers,
             f"shards.path={spec!r}: {len(files)} .tar files cannot be split across {producers} "
             "producers (each needs at least one): use fewer producer ranks or more shards")
    for path in files:
        try:
            samples = iter_samples(path)
            first = next(samples, None)
            samples.close()
            _require(first is not None, f"shards.path={spec!r}: shard {path} holds no sample")
            if not cfg.shards.skip_bad_samples:
                decode_sample(path, *first, cfg.producer.output_size, cfg.shards.resize,
                              cfg.batch.views_per_caption)
        except ShardError as err:
            raise InputError(f"shards.path={spec!r}: {err}") from None


def _check_eval(cfg: Config) -> None:
    dataset = cfg.eval.dataset
    # A named suite replaces eval.dataset (its images are rendered, nothing to find).
    if not cfg.eval.probe_at_end or cfg.eval.suite or dataset == "procedural":
        return
    root = Path(dataset)
    for split in ("train", "val"):
        _require((root / split).is_dir(),
                 f"eval.dataset={dataset!r}: no {split}/ folder there (give an ImageFolder root "
                 "with train/ and val/, 'procedural', or eval.probe_at_end=false)")


def _check_real_images(cfg: Config, trainers: int) -> None:
    """The real image source of `mix.*`: it exists, holds images for every trainer, and the first
    sample of every shard (or the first image) decodes."""
    if cfg.mix.real_fraction == 0:
        return
    from online_stablerep.producers.cursor import Unreadable
    from online_stablerep.training import real_images as real

    path = cfg.mix.real_path
    _require(Path(path).expanduser().exists() or bool(real.shard_files(path)),
             f"mix.real_path={path!r}: no such folder or matching .tar shards")
    try:
        if real.is_image_folder(path):
            source = real.ImageFolderSource(path, cfg.mix.caption_template)
            count = len(source)
            if not cfg.mix.skip_bad_samples:
                _, first = next(source.epoch(0, 0, 1, 0, cfg.producer.output_size))
                if isinstance(first, Unreadable):
                    raise first.error
        else:
            source = real.ShardSource(path)
            count = 0
            for shard in source.files:
                samples = real.shard_samples(shard)
                first = next(samples, None)
                _require(first is not None, f"mix.real_path: shard {shard} holds no sample")
                if not cfg.mix.skip_bad_samples:
                    real.decode_shard_sample(shard, *first, cfg.producer.output_size)
                # Counting reads whole shards: only where few shards could leave a trainer none.
                count += 1 + (sum(1 for _ in samples) if len(source.files) < trainers else 0)
    except real.RealImageError as err:
        raise InputError(str(err)) from None
    _require(count >= trainers,
             f"mix.real_path={path!r}: {count} images cannot be shared by {trainers} trainer "
             "ranks (each needs at least one)")


def check_inputs(cfg: Config, world_size: int, local_world_size: int | None = None) -> Roles:
    """Check what `cfg` points at for a job of `world_size` ranks; returns the job's roles.

    Raises:
        InputError: naming the key, file or value that cannot work and what to do.
    """
    try:
        roles = Roles.from_spec(cfg.roles.generators, world_size, local_world_size)
    except ConfigError as err:
        raise InputError(str(err)) from None
    _check_writable_folder("output_dir", Path(cfg.output_dir))
    _check_backbone(cfg)
    producers = world_size if roles.colocated else roles.num_generators
    if cfg.shards.write_dir:
        _check_writable_folder("shards.write_dir", Path(cfg.shards.write_dir).expanduser())
    if cfg.producer.kind == "diffusion":
        _check_generator_model(cfg)
        _check_captions(cfg, producers)
    elif cfg.producer.kind == "shards":
        _check_shards(cfg, producers)
    else:
        _require(cfg.procedural.num_categories >= cfg.batch.captions_per_batch,
                 f"procedural.num_categories={cfg.procedural.num_categories} < "
                 f"batch.captions_per_batch={cfg.batch.captions_per_batch}: a batch needs that "
                 "many distinct categories")
        _require(cfg.procedural.num_categories >= producers,
                 f"procedural.num_categories={cfg.procedural.num_categories} cannot be split "
                 f"across {producers} producers")
    _check_real_images(cfg, roles.num_trainers)
    _check_eval(cfg)
    return roles
