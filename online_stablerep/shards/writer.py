"""A background thread that writes one producer rank's caption groups into tar shards.

Files: `<dir>/rank{R:05d}-{index:06d}.tar`. A shard is written as `<name>.tar.tmp`, each sample
flushed and fsynced as it is added (so what a crash leaves in the `.tmp` is whole up to its last
sample), and on completion fsynced and renamed: a file under its final name is always complete.

On start the writer recovers what an earlier run of the same rank left: it reads the keys of the
complete shards (so groups made again after a resume are skipped), and moves the complete samples
of a leftover `.tmp` into a complete shard of the same index (written as `.tar.salvage`, then
renamed, then the `.tmp` removed: a crash at any point leaves either the `.tmp` or the shard).
Each complete shard gets a key index beside it (`<name>.tar.keys`: its size, its keys and their
count), so a resume reads a small file per shard instead of every tar header (0.4-1.3 s for a
600 MB shard of 1,000 groups, minutes for a rank's thousand shards). The index only speeds
recovery up: one that is missing, torn or does not match its shard's size is replaced by a scan.

The producer hands groups over through a bounded queue (`put`); encoding and writing run in the
thread, so only a writer slower than generation makes the producer wait. A write error stops the
thread; the next `put` or `close` raises it as a ShardWriteError naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import re
import tarfile
import threading
import time
from pathlib import Path

from online_stablerep.atomic import atomic_path
from online_stablerep.records import CaptionGroup
from online_stablerep.shards.format import (
    ShardError,
    add_sample,
    encode_group,
    iter_samples,
    sample_key,
    scan_keys,
)

# Niceness of the writer thread above its process's.
WRITER_NICENESS = 10
# Seconds between checks of the writer's health while a put waits for queue room.
_POLL_S = 0.5


class ShardWriteError(RuntimeError):
    """Caption groups cannot be written to their shards; the message names the file."""


def shard_name(rank: int, index: int) -> str:
    return f"rank{rank:05d}-{index:06d}.tar"


_INDEX_HEADER = "shard-keys v1"


def index_path(shard: Path) -> Path:
    return shard.with_name(shard.name + ".keys")


def write_key_index(shard: Path, keys: list[str]) -> None:
    """Write `shard`'s key index (tmp, fsync, rename). Best effort: without it a resume scans
    the shard's headers instead, so a failure to write it (a full disk) is not an error."""
    with contextlib.suppress(OSError), atomic_path(index_path(shard)) as part:
        with part.open("w") as f:
            f.write(f"{_INDEX_HEADER} size={shard.stat().st_size} count={len(keys)}\n")
            f.writelines(f"{key}\n" for key in keys)
            f.flush()
            os.fsync(f.fileno())


def read_key_index(shard: Path) -> list[str] | None:
    """The keys of `shard` from its index; None when there is no index or it does not match."""
    try:
        lines = index_path(shard).read_text().splitlines()
        header = lines[0].split()
        size, count = (int(field.split("=")[1]) for field in header[2:4])
    except (OSError, IndexError, ValueError):
        return None
    keys = lines[1:]
    matches = " ".join(header[:2]) == _INDEX_HEADER and len(keys) == count
    return keys if matches and size == shard.stat().st_size else None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe(err: BaseException, path: Path) -> str:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        what = "file too large (a file size limit)" if err.errno == errno.EFBIG else (
            "no space left on device")
        return (f"cannot write shard {path}: {what}; its complete samples are kept and "
                "recovered on resume: free space, then resume=true")
    return f"cannot write shard {path}: {type(err).__name__}: {err}"


class ShardWriter:
    """Writes caption groups of one producer rank to tar shards from a background thread."""

    def __init__(self, directory: str | Path, rank: int, image_format: str = "png",
                 quality: int = 95, groups_per_shard: int = 1000, queue_groups: int = 64) -> None:
        self.directory = Path(directory)
        self.rank = rank
        self.image_format = image_format
        self.quality = quality
        self.groups_per_shard = groups_per_shard
        # Keys on disk or queued: a group with one of these is not written again.
        self.keys: set[str] = set()
        # Groups written (fsynced) so far, counted by the sequence number put() returns.
        self.durable = 0
        self.written = 0
        self.recovered = 0
        self._queued = 0
        self._next_index = 0
        self._queue: queue.Queue = queue.Queue(maxsize=queue_groups)
        self._error: ShardWriteError | None = None
        self._raised = False
        self._path: Path | None = None
        self._recover()
        self._thread = threading.Thread(target=self._run, name=f"shard-writer-{rank}", daemon=True)
        self._thread.start()

    # --- recovery --------------------------------------------------------------------------
    def _recover(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            pattern = re.compile(rf"^rank{self.rank:05d}-(\d{{6}})\.tar(\.tmp|\.salvage)?$")
            found = sorted((int(m.group(1)), m.group(2), p) for p in self.directory.iterdir()
                           if (m := pattern.match(p.name)))
            for index, suffix, path in found:
                self._next_index = max(self._next_index, index + 1)
                if suffix is None:
                    keys = read_key_index(path)
                    if keys is None:
                        keys = scan_keys(path)
                        write_key_index(path, keys)  # the next resume reads it
                    self.keys.update(keys)
                elif suffix == ".salvage":
                    # A salvage killed before its rename: its .tmp is still there.
                    path.unlink()
            for index, suffix, path in found:
                if suffix == ".tmp":
                    self._salvage(path, self.directory / shard_name(self.rank, index))
        except ShardError as err:
            raise ShardWriteError(f"{err}: move it away from shards.write_dir") from None
        except OSError as err:
            raise ShardWriteError(_describe(err, self.directory)) from None

    def _salvage(self, tmp: Path, final: Path) -> None:
        samples = [(k, f) for k, f in iter_samples(tmp, complete_only=True) if k not in self.keys]
        if samples and not final.exists():
            with atomic_path(final, ".salvage") as part, part.open("wb") as f:
                with tarfile.open(fileobj=f, mode="w") as tar:
                    for key, fields in samples:
                        add_sample(tar, key, fields, time.time())
                f.flush()
                os.fsync(f.fileno())
            write_key_index(final, [k for k, _ in samples])
            self.keys.update(k for k, _ in samples)
            self.recovered += len(samples)
        tmp.unlink()
        _fsync_dir(self.directory)

    # --- producer side ---------------------------------------------------------------------
    def check(self) -> None:
        """Raise the writer thread's error, once."""
        if self._error is not None and not self._raised:
            self._raised = True
            raise self._error

    def put(self, group: CaptionGroup) -> int | None:
        """Queue a group; returns its sequence number, or None when its key was written already.

        Waits while the queue is full, checking the thread's health.

        Raises:
            ShardWriteError: the writer failed (names the file).
        """
        key = sample_key(group.epoch, group.caption_id)
        if key in self.keys:
            return None
        self.check()
        while True:
            try:
                self._queue.put((key, group), timeout=_POLL_S)
                break
            except queue.Full:
                self.check()
        self.keys.add(key)
        self._queued += 1
        return self._queued

    def close(self) -> None:
        """Write what is queued, complete the last shard and stop the thread.

        Raises:
            ShardWriteError: the writer failed and this was not reported yet.
        """
        if self._thread.is_alive():
            while self._error is None:
                try:
                    self._queue.put(None, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            self._thread.join()
        self.check()

    # --- writer thread ---------------------------------------------------------------------
    def _run(self) -> None:
        # Below the producer and trainer threads in priority (Linux: per thread): the writer
        # takes the CPU they leave idle; only a writer that cannot keep up at all makes the
        # producer wait, through the bounded queue.
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(
                os.PRIO_PROCESS, 0) + WRITER_NICENESS)
        file, tar, keys = None, None, []
        try:
            while (item := self._queue.get()) is not None:
                key, group = item
                fields = encode_group(group, self.image_format, self.quality)
                if file is None:
                    self._path = self.directory / (shard_name(self.rank, self._next_index) + ".tmp")
                    file = self._path.open("wb")
                    tar = tarfile.open(fileobj=file, mode="w")
                add_sample(tar, key, fields, time.time())
                file.flush()
                os.fsync(file.fileno())
                self.durable += 1
                self.written += 1
                keys.append(key)
                if len(keys) == self.groups_per_shard:
                    self._finish(file, tar, keys)
                    file, tar, keys = None, None, []
            if file is not None:
                self._finish(file, tar, keys)
        except BaseException as err:
            self._error = ShardWriteError(_describe(err, self._path or self.directory))
            if file is not None:
                # Closing flushes the torn sample's buffered bytes, which fails the same way.
                with contextlib.suppress(OSError):
                    file.close()

    def _finish(self, file, tar: tarfile.TarFile, keys: list[str]) -> None:
        """Complete the current shard: end-of-archive blocks, fsync, rename into place, then
        its key index."""
        assert self._path is not None
        tar.close()
        file.flush()
        os.fsync(file.fileno())
        file.close()
        final = self._path.with_suffix("")
        self._path.rename(final)
        _fsync_dir(self.directory)
        write_key_index(final, keys)
        self._next_index += 1
        self._path = None
