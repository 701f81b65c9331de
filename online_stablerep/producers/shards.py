"""The offline regime: caption groups read back from WebDataset shards (shards/format.py), as
the paper trained on stored images.

Each sample holds m images of one caption; the replay buffer draws k of them per use, as for
generated groups. Shard files (sorted by name) are split across producer ranks, file f going to
rank f mod P, and each epoch visits a rank's files in an order drawn from (producer.seed, epoch)
(`shards.shuffle_files`), until `train.epochs` (0: no limit). The cursor (producers/cursor.py)
is (epoch, file, sample): a resumed run continues with the next sample. Caption ids, captions,
guidance scales and seeds are the stored ones; `epoch` and `producer_rank` are the reading pass
and rank.

Images must be RGB (grayscale is converted) of producer.output_size pixels, unless
`shards.resize=true`. A bad sample or shard raises ShardError naming the file and key, or with
`shards.skip_bad_samples=true` is skipped, counted and logged (a damaged tar: the rest of it),
by the cursor's one policy for unreadable samples.
"""

from __future__ import annotations

import glob
import time
from pathlib import Path
from typing import Any

import numpy as np

from online_stablerep.config.schema import Config
from online_stablerep.producers.cursor import Epoch, EpochStream, Position, SkipBad, Unreadable
from online_stablerep.records import CaptionGroup
from online_stablerep.shards.format import ShardError, decode_sample, iter_samples


def shard_files(spec: str) -> list[Path]:
    """The .tar files `shards.path` names: a folder's *.tar, or a glob; sorted by name. A glob's
    other files (the writer's `.tar.keys` indexes, a `.tar.tmp` of a running export) are not
    shards."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return sorted(p for p in path.glob("*.tar") if p.is_file())
    return sorted(p for p in map(Path, glob.glob(str(path))) if p.is_file() and p.suffix == ".tar")


class StoredGroups(EpochStream[CaptionGroup]):
    """The caption groups of one rank's share of the shard files, epoch after epoch. The cursor
    (epoch, file, sample) says which file of this epoch's order is read and how many of its
    samples were consumed."""

    position_keys = ("file", "sample")

    def __init__(self, cfg: Config, files: list[Path], shard: int, num_shards: int, rank: int,
                 max_epochs: int, min_images: int) -> None:
        skip = SkipBad("shards.skip_bad_samples", cfg.shards.skip_bad_samples, "shards", rank)
        super().__init__("shards", {"files": len(files), "shard": shard,
                                    "num_shards": num_shards},
                         "the same shard files and layout", max_epochs, skip)
        self.spec, self.files, self.rank = cfg.shards.path, files, rank
        self.seed, self.shuffle = cfg.producer.seed, cfg.shards.shuffle_files
        self.size, self.resize = cfg.producer.output_size, cfg.shards.resize
        self.min_images = min_images

    def _epoch(self, epoch: int, start: Position) -> Epoch[CaptionGroup]:
        order = list(range(len(self.files)))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.files)).tolist()
        first, done = start
        for file in range(first, len(order)):
            path = self.files[order[file]]
            read = done if file == first else 0
            samples = iter_samples(path)
            try:
                for _ in range(read):  # resume: pass the samples already consumed
                    if next(samples, None) is None:
                        raise ShardError(f"shard {path}: fewer samples than the cursor's {read}: "
                                         "was it rewritten?")
                for key, fields in samples:
                    read += 1
                    try:
                        meta, images = decode_sample(path, key, fields, self.size, self.resize,
                                                     self.min_images)
                    except ShardError as err:
                        yield (file, read), Unreadable(err)
                        continue
                    yield (file, read), CaptionGroup(
                        caption_id=int(meta["caption_id"]), caption=str(meta["caption"]),
                        images_kchw=images, guidance_scale=float(meta["guidance_scale"]),
                        seed=int(meta["seed"]), producer_rank=self.rank,
                        created_at=time.time(), epoch=epoch)
            except ShardError as err:
                # A damaged tar: nothing after the damage can be read.
                yield (file + 1, 0), Unreadable(err)
            finally:
                samples.close()  # closes the tar file

    def _empty_epoch(self) -> Exception:
        return ShardError(f"shards.path={self.spec!r}: no readable sample in the "
                          f"{len(self.files)} shard files of rank {self.rank} "
                          f"({self.skipped} skipped)")


class ShardsProducer:
    """The Producer of caption groups stored in this rank's share of the shard files.

    Args:
        max_epochs: passes over the files (the trainer's train.epochs; 0: no end).
        min_images: images a stored group needs at least (the trainer's
            batch.views_per_caption).
    """

    def __init__(self, cfg: Config, shard: int, num_shards: int, rank: int = 0,
                 max_epochs: int = 0, min_images: int = 2) -> None:
        self.captions_per_call = cfg.producer.captions_per_call
        files = shard_files(cfg.shards.path)
        if len(files) < num_shards:
            raise ShardError(f"shards.path={cfg.shards.path!r}: {len(files)} .tar files cannot be "
                             f"split across {num_shards} producers (each needs at least one)")
        self.stream = StoredGroups(cfg, files[shard::num_shards], shard, num_shards, rank,
                                   max_epochs, min_images)

    @property
    def skipped(self) -> int:
        return self.stream.skipped

    def next_groups(self) -> list[CaptionGroup]:
        """Up to `producer.captions_per_call` stored groups; [] once max_epochs is reached."""
        return self.stream.take(self.captions_per_call)

    def start(self) -> None:
        """Nothing to build: files are opened as they are reached."""

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the cursor; the shard files and layout must match the saved ones."""
        self.stream.load_state_dict(state)

    def close(self) -> None:
        self.stream.close()
