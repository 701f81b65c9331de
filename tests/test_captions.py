"""Caption corpora: formats, stable ids across files, lazy reads, and bad input named by line."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from online_stablerep.config.schema import CaptionsConfig
from online_stablerep.producers.captions import CaptionSource


def _open(path: Path, **kwargs) -> CaptionSource:
    return CaptionSource.open(CaptionsConfig(path=str(path), **kwargs))


def _all(source: CaptionSource) -> list[str]:
    return [source.get(i) for i in range(len(source))]


def test_demo_captions_are_packaged():
    source = CaptionSource.open(CaptionsConfig())
    assert len(source) >= 150
    assert all(source.get(i) for i in (0, len(source) - 1))


def test_txt_csv_tsv_parquet_in_a_directory_get_ids_in_sorted_file_order(tmp_path):
    (tmp_path / "b.txt").write_text("a dog\n a cat \r\n")
    (tmp_path / "a.csv").write_text('id,caption\n1,"a red car, parked"\n2,"two\nlines"\n')
    (tmp_path / "c.tsv").write_text("caption\tid\nsnow on a roof\t7\n")
    pq.write_table(pa.table({"caption": ["p0", "p1", "p2"]}), tmp_path / "d.parquet",
                   row_group_size=2)
    (tmp_path / "notes.md").write_text("ignored\n")
    source = _open(tmp_path)
    assert _all(source) == ["a red car, parked", "two\nlines", "a dog", "a cat",
                            "snow on a roof", "p0", "p1", "p2"]
    # Random access in any order reads the same text.
    assert [source.get(i) for i in (7, 0, 5, 3, 6)] == ["p2", "a red car, parked", "p0",
                                                         "a cat", "p1"]
    assert source.skipped == 0


def test_named_column(tmp_path):
    (tmp_path / "x.csv").write_text("url,text\nhttp://a,hello there\n")
    assert _all(_open(tmp_path / "x.csv", column="text")) == ["hello there"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", b"", "holds no captions"),
        ("blank.txt", b"one\n\nthree\n", "blank.txt:2: empty caption"),
        ("bytes.txt", b"one\ntwo\n\xff\xfe bad\n", "bytes.txt:3: undecodable bytes"),
        ("nocol.csv", b"url,text\nx,y\n", "nocol.csv:1: no column 'caption'"),
        ("emptycell.csv", b"caption,id\nfine,1\n,2\n", "emptycell.csv:3: empty caption"),
        ("table.json", b"{}", "expected one of"),
    ],
)
def test_bad_files_are_named_with_their_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        _open(tmp_path / name)


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        _open(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="holds no captions"):
        _open(tmp_path)


def test_parquet_bad_rows_and_missing_column(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"caption": ["ok", None, "  ", "fine"]}), path)
    with pytest.raises(ValueError, match=r"c.parquet: row 1: empty caption"):
        _open(path)
    with pytest.raises(ValueError, match="no column 'text'"):
        _open(path, column="text")
    source = _open(path, skip_bad_rows=True)
    assert _all(source) == ["ok", "fine"] and source.skipped == 2


def test_skip_bad_rows_counts_and_logs(tmp_path, caplog):
    (tmp_path / "c.txt").write_bytes(b"one\n\n\xff\ntwo\n   \nthree\n")
    source = _open(tmp_path / "c.txt", skip_bad_rows=True)
    assert _all(source) == ["one", "two", "three"]
    assert source.skipped == 3
    assert "skipped 3 bad rows" in caplog.text


def test_index_is_offsets_not_text(tmp_path):
    lines = [f"caption number {i} " + "x" * 50 for i in range(20000)]
    (tmp_path / "big.txt").write_text("\n".join(lines) + "\n")
    source = _open(tmp_path / "big.txt")
    assert len(source) == 20000 and source.get(12345) == lines[12345]
    # One int64 offset per caption is all that is kept.
    assert source.files[0].rows.nbytes == 8 * 20000
