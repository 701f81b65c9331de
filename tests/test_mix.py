"""Real images mixed into trainer batches (`mix.*`): batch layout, loss positives, resume, the
two source formats and their bad inputs."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from online_stablerep.config import load_config
from online_stablerep.jobs.preflight import InputError, check_inputs
from online_stablerep.losses.multi_positive import multi_positive_contrastive_loss
from online_stablerep.producers.procedural import ProceduralProducer
from online_stablerep.replay import ReplayBuffer
from online_stablerep.training.mixed_source import MixedSource
from online_stablerep.training.real_images import RealImageStream
from online_stablerep.training.sources import ColocatedSource
from tests.helpers import TINY_PROCEDURAL, read_summary, run_cli, tensorboard_tags

CLASSES = ("red_fox", "tabby_cat", "oak")


def _picture(seed: int, size: tuple[int, int] = (40, 48), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(
        mode)


def _image_folder(root: Path, per_class: int = 4) -> Path:
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            _picture(c * 100 + i).save(root / name / f"{i}.png")
    return root


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _real_shards(root: Path, samples: list[dict], per_shard: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(samples), per_shard):
        with wds.TarWriter(str(root / f"real-{s // per_shard:04d}.tar")) as sink:
            for sample in samples[s : s + per_shard]:
                sink.write(sample)
    return root


def _cfg(tmp_path: Path, *extra: str):
    return load_config("cpu_procedural", [*TINY_PROCEDURAL, f"output_dir={tmp_path / 'out'}",
                                          *extra])


def _mixed(cfg, real_path: Path) -> MixedSource:
    n, k = cfg.batch.captions_per_batch, cfg.batch.views_per_caption
    buffer = ReplayBuffer(cfg.replay.capacity, cfg.replay.max_reuse, min_pool=8)
    inner = ColocatedSource(ProceduralProducer(cfg, 0, 1), buffer, n - 2, k)
    real = RealImageStream(str(real_path), cfg.mix.caption_template, cfg.producer.output_size,
                           0, 1, cfg.seed)
    return MixedSource(inner, real, 2, k)


def test_mixed_batch_holds_the_real_share_and_one_image_per_real_group(tmp_path):
    folder = _image_folder(tmp_path / "real")
    cfg = _cfg(tmp_path, "mix.real_fraction=0.25", f"mix.real_path={folder}")
    source = _mixed(cfg, folder)
    n, k = cfg.batch.captions_per_batch, cfg.batch.views_per_caption
    batch = source.next_batch()
    assert batch.captions_per_batch == n and batch.images.shape[0] == k * n
    ids = batch.caption_ids.view(k, n)
    # Every view lists the groups in the same order; the last two are the real images.
    assert (ids == ids[0]).all()
    assert (ids[0, : n - 2] >= 0).all() and (ids[0, n - 2 :] < 0).all()
    images = batch.images.view(k, n, *batch.images.shape[1:])
    for i in range(n - 2, n):
        # One image per real group: its k rows are the same picture until augmented.
        assert all(torch.equal(images[v, i], images[0, i]) for v in range(k))
    assert batch.captions[n - 2 :][0].startswith("a photo of a ")
    assert source.metrics()["mix/real_share"] == pytest.approx(2 / n)


def test_a_real_images_positives_are_its_own_views_only():
    """Caption id -(1 + uid): a real row's positives in the loss are its k - 1 other views."""
    k, n_gen = 3, 4
    gen = torch.arange(n_gen).repeat(k)
    ids = torch.cat([gen.view(k, n_gen), torch.tensor([[-1, -2]]).expand(k, -1)], 1).reshape(-1)
    features = torch.randn(ids.shape[0], 8, requires_grad=True)
    multi_positive_contrastive_loss(features, ids).backward()
    positives = (ids[:, None] == ids[None, :]).fill_diagonal_(False)
    real_rows = (ids < 0).nonzero().flatten()
    assert (positives[real_rows].sum(1) == k - 1).all()
    assert not positives[real_rows][:, ids >= 0].any()


def test_real_stream_resumes_where_it_stopped_and_wraps_epochs(tmp_path):
    folder = _image_folder(tmp_path / "real", per_class=2)  # 6 images, 3 per share of 2
    stream = RealImageStream(str(folder), "a photo of a {}", 16, 1, 2, seed=0)
    first = stream.take(2)
    state = stream.state_dict()
    rest = stream.take(5)  # crosses into epoch 1 and 2
    again = RealImageStream(str(folder), "a photo of a {}", 16, 1, 2, seed=0)
    again.load_state_dict(state)
    assert [x.uid for x in again.take(5)] == [x.uid for x in rest]
    assert {x.uid for x in first + rest} <= {1, 3, 5}  # only this rank's share
    assert stream.epoch == 2


def test_webdataset_real_shards_give_their_captions(tmp_path):
    samples = [{"__key__": f"s{i:03d}", "jpg": _encode(_picture(i), "JPEG"),
                "txt": f"caption {i}"} for i in range(5)]
    root = _real_shards(tmp_path / "shards", samples)
    stream = RealImageStream(str(root / "*.tar"), "unused {}", 24, 0, 1, seed=0)
    got = stream.take(5)
    assert [x.caption for x in got] == [f"caption {i}" for i in range(5)]
    assert got[0].image.shape == (3, 24, 24) and got[0].image.dtype == torch.uint8


def _bad_shards(tmp_path: Path, case: str) -> Path:
    root = tmp_path / case
    good = {"__key__": "ok", "png": _encode(_picture(0)), "txt": "fine"}
    if case == "missing_caption":
        _real_shards(root, [{"__key__": "nocap", "png": _encode(_picture(0))}])
    elif case == "not_an_image":
        _real_shards(root, [{"__key__": "junk", "png": b"not a png", "txt": "x"}])
    elif case == "corrupt_tar":
        _real_shards(root, [good])
        path = root / "real-0000.tar"
        path.write_bytes(path.read_bytes()[:700] + b"\x00garbage" * 50)
    elif case == "empty_tar":
        root.mkdir()
        tarfile.open(root / "real-0000.tar", "w").close()
    return root


@pytest.mark.parametrize("case, expected", [
    ("missing_caption", "sample 'nocap' has keys ['png']"),
    ("not_an_image", "sample 'junk': cannot decode png"),
    ("corrupt_tar", "real-0000.tar"),
    ("empty_tar", "real-0000.tar holds no sample"),
])
def test_bad_real_shards_are_named_before_training(tmp_path, case, expected):
    root = _bad_shards(tmp_path, case)
    cfg = _cfg(tmp_path, "mix.real_fraction=0.25", f"mix.real_path={root}")
    with pytest.raises(InputError) as err:
        check_inputs(cfg, 1)
    assert expected in str(err.value)


def test_bad_real_samples_are_skipped_and_counted_when_asked(tmp_path):
    samples = [{"__key__": f"s{i}", "png": _encode(_picture(i)), "txt": f"c{i}"}
               for i in range(4)]
    samples[1] = {"__key__": "junk", "png": b"not a png", "txt": "x"}
    samples[2] = {"__key__": "nocap", "png": _encode(_picture(2))}
    root = _real_shards(tmp_path / "shards", samples, per_shard=4)
    cfg = _cfg(tmp_path, "mix.real_fraction=0.25", f"mix.real_path={root}",
               "mix.skip_bad_samples=true")
    check_inputs(cfg, 1)  # no error: the bad samples are skipped at run time
    stream = RealImageStream(str(root), "{}", 16, 0, 1, seed=0, skip_bad=True)
    assert [x.caption for x in stream.take(4)] == ["c0", "c3", "c0", "c3"]
    assert stream.skipped == 4  # two bad samples, met in each of two epochs
    strict = RealImageStream(str(root), "{}", 16, 0, 1, seed=0)
    with pytest.raises(ValueError, match="sample 'junk'"):
        strict.take(2)


def test_bad_real_folders_are_named_before_training(tmp_path):
    missing = _cfg(tmp_path, "mix.real_fraction=0.25", f"mix.real_path={tmp_path / 'nope'}")
    with pytest.raises(InputError, match="no such folder"):
        check_inputs(missing, 1)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    empty = _cfg(tmp_path, "mix.real_fraction=0.25", f"mix.real_path={tmp_path / 'empty'}")
    with pytest.raises(InputError, match="no images in its class folders"):
        check_inputs(empty, 1)
    tiny = _image_folder(tmp_path / "tiny", per_class=1)
    few = _cfg(tmp_path, "mix.real_fraction=0.25", f"mix.real_path={tiny}")
    with pytest.raises(InputError, match="3 images cannot be shared by 4 trainer ranks"):
        check_inputs(few, 4)


@pytest.mark.slow
def test_training_job_logs_the_real_share_and_resumes_exactly(tmp_path):
    """With real images decoded ahead (the default), a stopped and resumed run trains on the
    same batches as an uninterrupted one: the checkpoint holds the cursor handed out."""
    folder = _image_folder(tmp_path / "real")

    def train(out: Path, *extra: str):
        result = run_cli(["train", "--config", "cpu_procedural", *TINY_PROCEDURAL,
                          "train.steps=5", "train.checkpoint_every=0", "mix.real_fraction=0.25",
                          f"mix.real_path={folder}", f"output_dir={out}", *extra])
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    out, part = tmp_path / "run", tmp_path / "part"
    train(out)
    train(part, "train.stop_after=2")
    assert "resumed from" in train(part, "resume=true").stdout
    assert read_summary(part)["losses"] == read_summary(out)["losses"]
    assert "mix/real_share" in tensorboard_tags(out / "tensorboard" / "train")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard" / "train"))
    acc.Reload()
    assert acc.Scalars("mix/real_share")[-1].value == pytest.approx(0.25)


@pytest.mark.slow
def test_a_bad_real_image_met_mid_run_stops_with_one_line_naming_it(tmp_path):
    """The start-up check decodes only the first image of each share; a bad one met later (on
    the prefetching thread) ends the job with the file named and no traceback (input, not a
    bug)."""
    from online_stablerep.training.real_images import ImageFolderSource

    folder = _image_folder(tmp_path / "real", per_class=2)
    source = ImageFolderSource(str(folder), "a photo of a {}")
    first = next(source.epoch(0, 0, 1, 0, 16))[1].uid  # what the check decodes (seed 0)
    for uid, (path, _) in enumerate(source.items):
        if uid != first:
            path.write_bytes(b"not a png")
    result = run_cli(["train", "--config", "cpu_procedural", *TINY_PROCEDURAL, "train.steps=4",
                      "mix.real_fraction=0.25", f"mix.real_path={folder}",
                      f"output_dir={tmp_path / 'run'}"])
    assert result.returncode == 1, result.stdout + result.stderr
    assert "failed: RealImageError: mix.real_path: cannot read image" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
