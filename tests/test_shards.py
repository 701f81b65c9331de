"""Caption groups written to WebDataset shards and read back (shards/, producers/shard_writing.py,
producers/shards.py), in one process: round trip, crash leftovers, replay after a lost queue,
a full disk, and every bad shard input answered with its error."""

import errno
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from online_stablerep.config import load_config
from online_stablerep.jobs.preflight import InputError, check_inputs
from online_stablerep.producers import build_producer
from online_stablerep.producers.procedural import ProceduralProducer
from online_stablerep.producers.shards import shard_files
from online_stablerep.records import CaptionGroup
from online_stablerep.shards import writer as writer_module
from online_stablerep.shards.format import ShardError, iter_samples, sample_key, scan_keys
from online_stablerep.shards.writer import ShardWriteError
from tests.helpers import TINY_PROCEDURAL


def config(tmp_path: Path, *extra: str):
    return load_config("cpu_procedural", [*TINY_PROCEDURAL, f"output_dir={tmp_path / 'run'}",
                                          *extra])


def writer_config(tmp_path: Path, *extra: str):
    return config(tmp_path, f"shards.write_dir={tmp_path / 'shards'}", *extra)


def reader_config(tmp_path: Path, *extra: str):
    return config(tmp_path, "producer.kind=shards", f"shards.path={tmp_path / 'shards'}",
                  "shards.shuffle_files=false", *extra)


def drain(producer) -> list:
    groups = []
    while made := producer.next_groups():
        groups.extend(made)
    return groups


def all_keys(folder: Path) -> list[str]:
    return [k for p in sorted(folder.glob("*.tar")) for k in scan_keys(p)]


@pytest.mark.parametrize("image_format", ["png", "jpg", "webp"])
def test_read_back_equals_what_the_producer_makes(tmp_path, image_format):
    writing = build_producer(writer_config(tmp_path, "train.epochs=2", "shards.groups_per_shard=7",
                                        f"shards.image_format={image_format}"), 0, 1)
    writing.start()
    written = drain(writing)
    writing.close()
    direct = drain(ProceduralProducer(config(tmp_path), 0, 1, max_epochs=2))
    assert len(written) == len(direct) == 40
    # Only complete shards under final names, groups_per_shard each but the last, each with
    # its key index.
    names = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert names == sorted(f"rank00000-{i:06d}.tar{end}" for i in range(6) for end in ("", ".keys"))
    files = sorted((tmp_path / "shards").glob("*.tar"))
    for path in files:
        assert writer_module.read_key_index(path) == scan_keys(path)
    read = drain(build_producer(reader_config(tmp_path, "train.epochs=1"), 0, 1))
    assert [g.caption_id for g in read] == [g.caption_id for g in direct]
    for got, want in zip(read, direct, strict=True):
        assert got.caption == want.caption and got.seed == want.seed
        assert got.images_kchw.shape == want.images_kchw.shape
        diff = (got.images_kchw.float() - want.images_kchw.float()).abs().mean()
        assert diff == 0 if image_format == "png" else diff < 12
    # The files are plain WebDataset.
    import webdataset as wds

    sample = next(iter(wds.WebDataset(str(files[0]), shardshuffle=False)))
    assert sample["__key__"] == sample_key(0, direct[0].caption_id)
    assert json.loads(sample["json"])["caption_id"] == direct[0].caption_id
    assert {f"{j}.{image_format}" for j in range(3)} <= set(sample)


def test_shards_split_across_ranks_and_cursor_resumes(tmp_path):
    writing = build_producer(writer_config(tmp_path, "train.epochs=1", "shards.groups_per_shard=4"),
                           0, 1)
    drain(writing)
    writing.close()  # 20 groups: 5 shards
    cfg = reader_config(tmp_path, "train.epochs=2", "shards.shuffle_files=true",
                        "producer.captions_per_call=3")
    per_rank = [drain(build_producer(cfg, r, 2, rank=r)) for r in range(2)]
    ids = [sorted(g.caption_id for g in groups if g.epoch == 0) for groups in per_rank]
    assert sorted(ids[0] + ids[1]) == list(range(20)) and len(ids[0]) == 12  # files 0, 2, 4
    assert [g.epoch for g in per_rank[0]].count(1) == 12
    # Stop after 2 calls, resume in a new producer: the same stream.
    first = build_producer(cfg, 0, 2)
    head = first.next_groups() + first.next_groups()
    resumed = build_producer(cfg, 0, 2)
    resumed.load_state_dict(first.state_dict())
    tail = drain(resumed)
    assert [(g.epoch, g.caption_id) for g in head + tail] == [
        (g.epoch, g.caption_id) for g in per_rank[0]]


def _tmp_shard_with_torn_tail(tmp_path: Path) -> Path:
    """A leftover .tmp: two complete samples and a third cut off inside an image."""
    writing = build_producer(writer_config(tmp_path, "train.epochs=1", "shards.groups_per_shard=3"),
                           0, 1)
    drain(writing)
    writing.close()
    shard = tmp_path / "shards" / "rank00000-000000.tar"
    data = shard.read_bytes()
    third = [m for m in tarfile.open(shard) if m.name.startswith(scan_keys(shard)[2])][0]
    tmp = shard.with_name("rank00000-000009.tar.tmp")
    tmp.write_bytes(data[: third.offset_data + 100])
    for p in (tmp_path / "shards").glob("*.tar*"):
        if p != tmp:
            p.unlink()
    return tmp


def test_leftover_tmp_is_salvaged_into_a_complete_shard(tmp_path):
    tmp = _tmp_shard_with_torn_tail(tmp_path)
    writer = writer_module.ShardWriter(tmp_path / "shards", rank=0)
    writer.close()
    assert writer.recovered == 2 and len(writer.keys) == 2 and not tmp.exists()
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        "rank00000-000009.tar", "rank00000-000009.tar.keys"]
    salvaged = tmp_path / "shards" / "rank00000-000009.tar"
    assert writer_module.read_key_index(salvaged) == scan_keys(salvaged)
    assert len(list(iter_samples(tmp_path / "shards" / "rank00000-000009.tar"))) == 2


def _group(c: int) -> CaptionGroup:
    return CaptionGroup(c, f"caption {c}", torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 2.0, 0, 0,
                        0.0)


def test_a_resume_reads_key_indexes_and_rescans_a_bad_one(tmp_path, monkeypatch):
    folder = tmp_path / "shards"
    writer = writer_module.ShardWriter(folder, rank=0, groups_per_shard=2)
    for c in range(5):
        writer.put(_group(c))
    writer.close()
    shards = sorted(folder.glob("*.tar"))
    want = [sample_key(0, c) for c in range(5)]

    def no_scan(path):
        raise AssertionError(f"scanned {path}")

    # 1. Every shard has its index: no tar header is read.
    with monkeypatch.context() as patch:
        patch.setattr(writer_module, "scan_keys", no_scan)
        resumed = writer_module.ShardWriter(folder, rank=0, groups_per_shard=2)
        resumed.close()
    assert sorted(resumed.keys) == want
    # 2. A torn index (a key lost) and a missing one are replaced by a scan, and rewritten.
    index0 = writer_module.index_path(shards[0])
    index0.write_text(index0.read_text().rsplit("\n", 2)[0] + "\n")
    writer_module.index_path(shards[1]).unlink()
    assert writer_module.read_key_index(shards[0]) is None
    again = writer_module.ShardWriter(folder, rank=0, groups_per_shard=2)
    assert sorted(again.keys) == want
    assert again.put(_group(3)) is None  # already written: skipped
    again.close()
    assert [writer_module.read_key_index(p) for p in shards] == [want[:2], want[2:4], want[4:]]
    # 3. Offline training globbing the folder's files takes only the shards.
    assert shard_files(str(folder / "*")) == shards


_KILLED_WRITER = textwrap.dedent("""
    import sys, torch
    from online_stablerep.records import CaptionGroup
    from online_stablerep.shards.writer import ShardWriter
    writer = ShardWriter(sys.argv[1], rank=0, groups_per_shard=5)
    for c in range(100000):
        images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
        writer.put(CaptionGroup(c, f"caption {c}", images, 2.0, 0, 0, 0.0))
""")


@pytest.mark.slow
def test_writer_killed_mid_write_leaves_only_complete_shards(tmp_path):
    folder = tmp_path / "shards"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(folder)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while len(list(folder.glob("*.tar"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finals = sorted(folder.glob("*.tar"))
    assert len(finals) >= 3
    for path in finals:  # every file under a final name is whole: 5 complete samples
        samples = list(iter_samples(path))
        assert len(samples) == 5 and all("json" in fields for _, fields in samples)
    before = all_keys(folder)
    writer = writer_module.ShardWriter(folder, rank=0)
    writer.close()
    assert not list(folder.glob("*.tmp"))
    keys = all_keys(folder)
    assert len(keys) == len(set(keys)) == len(before) + writer.recovered
    # Keys follow the written order: no gap before what was recovered.
    assert keys == [sample_key(0, c) for c in range(len(keys))]


def test_groups_queued_at_a_crash_are_written_on_resume(tmp_path, monkeypatch):
    # The writer stalls after 2 groups: later groups are made and handed out but sit in its
    # queue when the "crash" comes. The cursor saved then must lead a resumed producer to
    # rewrite them, without handing them out again and without duplicates.
    release, crash = threading.Event(), threading.Event()
    encode = writer_module.encode_group
    written = []

    def stalling_encode(group, *args):
        if len(written) >= 2:
            release.wait()
            if crash.is_set():
                raise RuntimeError("crashed")
        written.append(group.caption_id)
        return encode(group, *args)

    monkeypatch.setattr(writer_module, "encode_group", stalling_encode)
    cfg = writer_config(tmp_path, "train.epochs=1", "producer.captions_per_call=4")
    producer = build_producer(cfg, 0, 1)
    handed = producer.next_groups() + producer.next_groups() + producer.next_groups()
    state = producer.state_dict()
    assert state["unwritten"]["calls"] == 3
    crash.set()
    release.set()
    with pytest.raises(ShardWriteError):
        producer.close()
    monkeypatch.setattr(writer_module, "encode_group", encode)
    resumed = build_producer(cfg, 0, 1)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state  # unchanged until the replay has run
    rest = drain(resumed)
    resumed.close()
    assert [g.caption_id for g in handed + rest] == [
        g.caption_id for g in drain(ProceduralProducer(config(tmp_path), 0, 1, max_epochs=1))]
    keys = all_keys(tmp_path / "shards")
    assert len(keys) == len(set(keys)) == 20


def test_full_disk_stops_the_producer_naming_the_shard(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def full(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).endswith(".tar.tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(writer_module.os, "fsync", full)
    producer = build_producer(writer_config(tmp_path, "shards.queue_groups=2"), 0, 1)
    with pytest.raises(ShardWriteError, match=r"rank00000-000000\.tar\.tmp: no space left"):
        for _ in range(10):  # the queue fills, put waits, sees the error: no hang
            producer.next_groups()
    producer.close()  # reported once already


def _write_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, fields in samples.items():
            for field, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _png(size: int = 32, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, len(mode)), 90, np.uint8).squeeze(), mode).save(
        buf, "PNG")
    return buf.getvalue()


def _sample(m: int = 3, image=None, drop: str = "") -> dict[str, bytes]:
    meta = {"caption_id": 1, "caption": "a", "epoch": 0, "guidance_scale": 2.0, "seed": 0,
            "producer_rank": 0, "num_images": m, "image_format": "png"}
    fields = {f"{j}.png": image or _png() for j in range(m)}
    fields["json"] = json.dumps(meta).encode()
    return {k: v for k, v in fields.items() if k != drop}


BAD_SHARDS = {
    # id: (files to write, name -> bytes or samples; text the error must name)
    "empty glob": ({}, "no .tar files"),
    "corrupt tar": ({"a.tar": b"not a tar at all" * 64}, "a.tar: not a readable tar"),
    "sample without json": ({"a.tar": {"k0": _sample(drop="json")}}, "'k0': no json member"),
    "missing image": ({"a.tar": {"k0": _sample(drop="1.png")}}, "'k0': missing image member(s) 1.png"),
    "wrong size": ({"a.tar": {"k0": _sample(image=_png(16))}}, "image is 16x16, producer.output_size=32"),
    "RGBA image": ({"a.tar": {"k0": _sample(image=_png(mode="RGBA"))}}, "image mode RGBA"),
    "undecodable image": ({"a.tar": {"k0": _sample(image=b"garbage")}}, "'k0', image 0.png: undecodable"),
    "too few images": ({"a.tar": {"k0": _sample(m=1)}}, "1 images, batch.views_per_caption=2"),
    "fewer files than producers": ({"a.tar": {"k0": _sample()}}, "1 .tar files cannot be split"),
}


@pytest.mark.parametrize("case", list(BAD_SHARDS))
def test_bad_shards_fail_before_training_naming_file_and_key(tmp_path, case):
    files, message = BAD_SHARDS[case]
    (tmp_path / "shards").mkdir()
    for name, content in files.items():
        if isinstance(content, bytes):
            (tmp_path / "shards" / name).write_bytes(content)
        else:
            _write_shard(tmp_path / "shards" / name, content)
    world = 2 if case.startswith("fewer") else 1
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_inputs(reader_config(tmp_path), world)


def test_grayscale_is_converted_and_resize_is_explicit(tmp_path):
    (tmp_path / "shards").mkdir()
    _write_shard(tmp_path / "shards" / "a.tar", {"k0": _sample(image=_png(mode="L")),
                                                 "k1": _sample(image=_png(48))})
    cfg = reader_config(tmp_path, "train.epochs=1", "shards.resize=true")
    check_inputs(cfg, 1)
    groups = drain(build_producer(cfg, 0, 1))
    assert [tuple(g.images_kchw.shape) for g in groups] == [(3, 3, 32, 32)] * 2
    assert torch.all(groups[0].images_kchw == 90)


def test_bad_sample_mid_shard_fails_or_is_skipped_and_counted(tmp_path, capsys):
    (tmp_path / "shards").mkdir()
    _write_shard(tmp_path / "shards" / "a.tar",
                 {"k0": _sample(), "k1": _sample(drop="json"), "k2": _sample()})
    good = tmp_path / "shards" / "a.tar"
    torn = [m for m in tarfile.open(good) if m.name.startswith("k1")][0].offset_data + 100
    (tmp_path / "shards" / "b.tar").write_bytes(good.read_bytes()[:torn])  # torn inside k1
    with pytest.raises(ShardError, match=r"a\.tar, sample 'k1': no json member"):
        drain(build_producer(reader_config(tmp_path, "train.epochs=1"), 0, 1))
    lenient = reader_config(tmp_path, "train.epochs=1", "shards.skip_bad_samples=true")
    producer = build_producer(lenient, 0, 1)
    groups = drain(producer)
    assert len(groups) == 3 and producer.skipped == 2
    out = capsys.readouterr().out
    assert "skipped (1 so far" in out and "b.tar: not a readable tar" in out
