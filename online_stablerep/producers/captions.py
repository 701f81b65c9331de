"""Caption corpora read lazily: .txt, .csv, .tsv, .parquet files or a directory of them.

A caption's global id is its row index across the corpus files in sorted order (bad rows skipped
with `captions.skip_bad_rows` take no id). Opening a corpus validates every row once and keeps
only an index: the byte offset of each text row (8 bytes a caption) or the row number of each
parquet row. Text is read back by id, so a 10M-caption corpus costs each rank ~80 MB, not the
corpus.
"""

from __future__ import annotations

import array
import csv
import io
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from online_stablerep.config.schema import CaptionsConfig

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".csv", ".tsv", ".parquet")


# Caption files shipped with the package, by the name `captions.path` may give instead of a path.
PACKAGED_CORPORA: dict[str, str] = {
    "demo": "demo_captions.txt",
    # The toy model's world (docs/toy-model.md): its categories, and the same with colour words.
    "toy": "toy_captions.txt",
    "toy_colours": "toy_captions_colours.txt",
}


def packaged_captions_path(name: str) -> Path:
    """The path of a caption file shipped with the package."""
    return Path(str(resources.files("online_stablerep") / "data" / PACKAGED_CORPORA[name]))


def demo_captions_path() -> Path:
    """The caption file shipped with the package (used when `captions.path` is empty)."""
    return packaged_captions_path("demo")


class _BadRow(ValueError):
    pass


def _check_caption(text: str | None, where: str) -> str:
    if text is None or not text.strip():
        raise _BadRow(f"{where}: empty caption")
    return text.strip()


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _BadRow(f"{where}: undecodable bytes ({err.reason} at byte {err.start})") from None


@dataclass
class _FileIndex:
    """One corpus file: where each of its good rows starts (byte offset or parquet row)."""

    path: Path
    # (rows,) int64 byte offsets (text formats) or row numbers (parquet) of good rows.
    rows: np.ndarray
    # Text formats: field index of the caption column (-1 for .txt). Parquet: unused.
    field: int = -1
    delimiter: str = ","


def _read_record(f: io.BufferedReader) -> bytes:
    """One CSV record from the current position: lines joined until quotes balance."""
    record = f.readline()
    while record.count(b'"') % 2 == 1:
        more = f.readline()
        if not more:
            break
        record += more
    return record


def _index_text(path: Path, column: str, skip: bool) -> tuple[_FileIndex, int]:
    delimiter = "\t" if path.suffix == ".tsv" else ","
    tabular = path.suffix != ".txt"
    # array('q') holds 8 bytes per row while indexing, where a list of ints holds ~36.
    offsets = array.array("q")
    skipped = 0
    field = -1
    with path.open("rb") as f:
        line_no, offset = 1, 0
        if tabular:
            header_raw = _read_record(f)
            header = next(csv.reader([_decode(header_raw, f"{path}:1")], delimiter=delimiter), [])
            if column not in header:
                raise ValueError(f"{path}:1: no column {column!r} in header {header}")
            field = header.index(column)
            offset, line_no = len(header_raw), 1 + header_raw.count(b"\n")
        while True:
            record = _read_record(f) if tabular else f.readline()
            if not record:
                break
            where = f"{path}:{line_no}"
            try:
                text = _decode(record, where)
                if tabular:
                    values = next(csv.reader([text], delimiter=delimiter), [])
                    text = values[field] if field < len(values) else None
                _check_caption(text, where)
                offsets.append(offset)
            except _BadRow as bad:
                if not skip:
                    raise ValueError(str(bad)) from None
                skipped += 1
            offset += len(record)
            line_no += record.count(b"\n")
    return _FileIndex(path, np.frombuffer(offsets, dtype=np.int64).copy(), field, delimiter), skipped


def _index_parquet(path: Path, column: str, skip: bool) -> tuple[_FileIndex, int]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{path}: not a readable parquet file ({err})") from None
    if column not in parquet.schema_arrow.names:
        raise ValueError(f"{path}: no column {column!r} (columns: {parquet.schema_arrow.names})")
    good: list[np.ndarray] = []
    skipped, start = 0, 0
    for group in range(parquet.num_row_groups):
        values = parquet.read_row_group(group, columns=[column]).column(0).to_pylist()
        keep = np.ones(len(values), dtype=bool)
        for i, value in enumerate(values):
            where = f"{path}: row {start + i}"
            try:
                _check_caption(_decode(value, where) if isinstance(value, bytes) else value, where)
            except _BadRow as bad:
                if not skip:
                    raise ValueError(str(bad)) from None
                keep[i] = False
                skipped += 1
        good.append(start + np.flatnonzero(keep))
        start += len(values)
    rows = np.concatenate(good).astype(np.int64) if good else np.zeros(0, np.int64)
    return _FileIndex(path, rows), skipped


class CaptionSource:
    """Random access to a caption corpus by global caption id."""

    def __init__(self, files: list[_FileIndex], column: str, skipped: int, name: str) -> None:
        self.files = files
        self.column = column
        self.skipped = skipped
        self.name = name
        # starts[i] = global id of file i's first good row.
        self._starts = np.cumsum([0] + [len(f.rows) for f in files[:-1]]).astype(np.int64)
        self._total = sum(len(f.rows) for f in files)
        self._parquet_cache: tuple[int, int, list] | None = None

    @classmethod
    def open(cls, cfg: CaptionsConfig) -> CaptionSource:
        """Index and validate the corpus at `cfg.path` (empty: the packaged demo captions; a name
        in PACKAGED_CORPORA: that packaged file).

        Raises:
            ValueError: naming the file and line (or row) of a missing file, an empty corpus, a
                missing column, undecodable bytes or an empty caption (bad rows are skipped and
                counted instead when `cfg.skip_bad_rows`).
        """
        if cfg.path in PACKAGED_CORPORA:
            root = packaged_captions_path(cfg.path)
        else:
            root = Path(cfg.path) if cfg.path else demo_captions_path()
        if root.is_dir():
            paths = sorted(p for p in root.iterdir() if p.suffix in SUFFIXES and p.is_file())
        elif root.is_file():
            if root.suffix not in SUFFIXES:
                raise ValueError(f"captions.path={str(root)!r}: expected one of {SUFFIXES}")
            paths = [root]
        else:
            raise ValueError(f"captions.path={str(root)!r}: no such file or directory")
        files, skipped = [], 0
        for path in paths:
            index = _index_parquet if path.suffix == ".parquet" else _index_text
            file_index, file_skipped = index(path, cfg.column, cfg.skip_bad_rows)
            files.append(file_index)
            skipped += file_skipped
        source = cls(files, cfg.column, skipped, str(root))
        if len(source) == 0:
            raise ValueError(f"captions.path={str(root)!r}: the corpus holds no captions")
        if skipped:
            log.warning("captions %s: skipped %d bad rows, kept %d", root, skipped, len(source))
        return source

    def __len__(self) -> int:
        return self._total

    def get(self, caption_id: int) -> str:
        """The text of caption `caption_id` (0 <= id < len(self))."""
        if not 0 <= caption_id < self._total:
            raise IndexError(f"caption id {caption_id} not in [0, {self._total})")
        file_no = int(np.searchsorted(self._starts, caption_id, side="right")) - 1
        entry = self.files[file_no]
        row = int(entry.rows[caption_id - self._starts[file_no]])
        if entry.path.suffix == ".parquet":
            return self._parquet_value(file_no, row)
        with entry.path.open("rb") as f:
            f.seek(row)
            if entry.field < 0:
                return f.readline().decode("utf-8").strip()
            text = _read_record(f).decode("utf-8")
        return next(csv.reader([text], delimiter=entry.delimiter))[entry.field].strip()

    def _parquet_value(self, file_no: int, row: int) -> str:
        parquet = pq.ParquetFile(self.files[file_no].path)
        group, first = 0, 0
        while first + parquet.metadata.row_group(group).num_rows <= row:
            first += parquet.metadata.row_group(group).num_rows
            group += 1
        # Keep the last row group read: captions of one group are often drawn close together.
        if self._parquet_cache is None or self._parquet_cache[:2] != (file_no, group):
            values = parquet.read_row_group(group, columns=[self.column]).column(0).to_pylist()
            self._parquet_cache = (file_no, group, values)
        value = self._parquet_cache[2][row - first]
        return (value.decode("utf-8") if isinstance(value, bytes) else value).strip()
