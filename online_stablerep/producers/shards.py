"""The offline regime: caption groups read back from WebDataset shards (shards/format.py), as
the paper trained on stored images.

Each sample holds m images of one caption; the replay buffer draws k of them per use, as for
generated groups. Shard files (sorted by name) are split across producer ranks, file f going to
rank f mod P, and each epoch visits a rank's files in an order drawn from (producer.seed, epoch)
(`shards.shuffle_files`), until `train.epochs` (0: no limit). The cursor is (epoch, file,
sample): a resumed run continues with the next sample. Caption ids, captions, guidance scales
and seeds are the stored ones; `epoch` and `producer_rank` are the reading pass and rank.

Images must be RGB (grayscale is converted) of producer.output_size pixels, unless
`shards.resize=true`. A bad sample or shard raises ShardError naming the file and key, or with
`shards.skip_bad_samples=true` is skipped, counted and logged (a damaged tar: the rest of it).
"""

from __future__ import annotations

import glob
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from online_stablerep.config.schema import Config
from online_stablerep.monitoring.metrics import console
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


class ShardsProducer:
    """The Producer of caption groups stored in this rank's share of the shard files."""

    def __init__(self, cfg: Config, shard: int, num_shards: int, rank: int = 0) -> None:
        self.cfg = cfg
        self.rank = rank
        self.shard = shard
        self.num_shards = num_shards
        files = shard_files(cfg.shards.path)
        if len(files) < num_shards:
            raise ShardError(f"shards.path={cfg.shards.path!r}: {len(files)} .tar files cannot be "
                             f"split across {num_shards} producers (each needs at least one)")
        self.files = files[shard::num_shards]
        self.epoch = 0
        self.file = 0  # position in this epoch's file order
        self.sample = 0  # samples of the current file handed out or skipped
        self.skipped = 0
        self._good_in_epoch = 0
        # Whether this process read the current epoch from its start (then an epoch without one
        # good sample means no good sample at all).
        self._whole_epoch = True
        self._samples: Iterator[tuple[str, dict[str, bytes]]] | None = None
        self._path: Path | None = None  # the file _samples reads

    def _order(self) -> list[int]:
        if not self.cfg.shards.shuffle_files:
            return list(range(len(self.files)))
        return np.random.default_rng([self.cfg.producer.seed, self.epoch]).permutation(
            len(self.files)).tolist()

    @property
    def exhausted(self) -> bool:
        return 0 < self.cfg.train.epochs <= self.epoch

    def _next_file(self) -> None:
        self._close_file()
        self.file, self.sample = self.file + 1, 0
        if self.file == len(self.files):
            if self._good_in_epoch == 0 and self._whole_epoch:
                raise ShardError(f"shards.path={self.cfg.shards.path!r}: no readable sample in "
                                 f"the {len(self.files)} shard files of rank {self.rank} "
                                 f"({self.skipped} skipped)")
            self.epoch, self.file, self._good_in_epoch = self.epoch + 1, 0, 0
            self._whole_epoch = True

    def _skip(self, err: ShardError) -> None:
        if not self.cfg.shards.skip_bad_samples:
            raise err
        self.skipped += 1
        console(f"skipped ({self.skipped} so far, shards.skip_bad_samples): {err}",
                role="shards", rank=self.rank)

    def _read(self) -> tuple[Path, str, dict[str, bytes]] | None:
        """The next raw sample of the stream, or None at the end of the current file."""
        if self._samples is None:
            self._path = self.files[self._order()[self.file]]
            self._samples = iter_samples(self._path)
            for _ in range(self.sample):  # resume: pass the samples already handed out
                next(self._samples)
        sample = next(self._samples, None)
        return None if sample is None else (self._path, *sample)

    def next_groups(self) -> list[CaptionGroup]:
        """Up to `producer.captions_per_call` stored groups; [] once `train.epochs` is reached."""
        p = self.cfg.producer
        out: list[CaptionGroup] = []
        while len(out) < p.captions_per_call and not self.exhausted:
            try:
                raw = self._read()
            except (ShardError, StopIteration) as err:
                # A damaged tar: nothing after the damage can be read.
                self._skip(err if isinstance(err, ShardError) else ShardError(
                    f"shard {self._path}: fewer samples than the cursor's {self.sample}: was it "
                    "rewritten?"))
                self._next_file()
                continue
            if raw is None:
                self._next_file()
                continue
            path, key, fields = raw
            self.sample += 1
            try:
                meta, images = decode_sample(path, key, fields, p.output_size,
                                             self.cfg.shards.resize, self.cfg.batch.views_per_caption)
            except ShardError as err:
                self._skip(err)
                continue
            self._good_in_epoch += 1
            out.append(CaptionGroup(
                caption_id=int(meta["caption_id"]), caption=str(meta["caption"]),
                images_kchw=images, guidance_scale=float(meta["guidance_scale"]),
                seed=int(meta["seed"]), producer_rank=self.rank, created_at=time.time(),
                epoch=self.epoch,
            ))
        return out

    def start(self) -> None:
        """Nothing to build: files are opened as they are reached."""

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "file": self.file, "sample": self.sample,
                "files": len(self.files), "shard": self.shard, "num_shards": self.num_shards}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the cursor; the shard files and layout must match the saved ones."""
        for key, have in (("files", len(self.files)), ("shard", self.shard),
                          ("num_shards", self.num_shards)):
            if state[key] != have:
                raise ValueError(
                    f"shards cursor was saved with {key}={state[key]}, this run has {key}={have}: "
                    "resume needs the same shard files and layout")
        self._close_file()
        self.epoch, self.file, self.sample = int(state["epoch"]), int(state["file"]), int(state["sample"])
        self._whole_epoch = self.file == 0 and self.sample == 0

    def _close_file(self) -> None:
        if self._samples is not None:
            self._samples.close()  # closes the tar file
            self._samples = None

    def close(self) -> None:
        self._close_file()
