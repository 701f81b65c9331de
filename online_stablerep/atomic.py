"""Atomic file writes: write beside the target under a temporary name, then rename it into place,
so a reader sees the old file or the new one, never half of one; and a write that fails (a full
disk, a signal, any exception) removes its temporary file instead of leaving it behind.

Every writer of the package that replaces a file whole goes through `atomic_path`. The one
exception is the shard writer's `.tar.tmp`, which is kept on purpose: its complete samples are
salvaged on resume (shards/writer.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield the temporary path to write (`path` + `suffix`, a file or a folder); on a clean
    exit rename it onto `path`, on any exception remove it and re-raise.

    Replacing a folder that exists is the caller's business (a rename onto a non-empty folder
    fails): this only guarantees that the temporary never outlives a failed write.
    """
    path = Path(path)
    tmp = path.with_name(path.name + suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def remove(path: Path) -> None:
    """Remove a file or folder if it is there; never raises (cleanup on a failing disk)."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def write_text(path: str | Path, text: str, suffix: str = ".tmp") -> None:
    """Replace the text file `path` atomically (see `atomic_path`)."""
    with atomic_path(path, suffix) as tmp:
        tmp.write_text(text, encoding="utf-8")
