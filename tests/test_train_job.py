"""The colocated training job end to end in one process: outputs, checkpoints, exact resume."""

from pathlib import Path

import pytest

from tests.helpers import TINY_PROCEDURAL, read_summary, run_cli, tensorboard_tags

pytestmark = pytest.mark.slow


def train(out: Path, *extra: str):
    result = run_cli(["train", "--config", "cpu_procedural", f"output_dir={out}",
                      *TINY_PROCEDURAL, *extra])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_run_writes_events_checkpoint_and_config(tmp_path):
    train(tmp_path, "train.steps=4", "train.checkpoint_every=2")
    summary = read_summary(tmp_path)
    assert summary["steps"] == 4 and len(summary["losses"]) == 4
    assert (tmp_path / "config.yaml").is_file()
    ckpts = sorted((tmp_path / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step_00000002", "step_00000004"]
    assert (ckpts[-1] / "meta.json").is_file() and (ckpts[-1] / "model.pt").is_file()
    tags = tensorboard_tags(tmp_path / "tensorboard" / "train")
    for tag in ("train/loss", "train/lr", "train/images_per_s", "train/idle_fraction",
                "buffer/groups", "buffer/mean_reuse", "buffer/age_s", "gen/images_per_s",
                "buffer/received_groups"):
        assert tag in tags, tag


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["train.steps=6", "train.checkpoint_every=0"]
    train(full, *common)
    train(part, *common, "train.stop_after=3")
    assert read_summary(part)["steps"] == 3
    resumed = train(part, *common, "resume=true")
    assert "resumed from" in resumed.stdout
    assert read_summary(part)["losses"] == read_summary(full)["losses"]


def test_incomplete_checkpoint_is_ignored(tmp_path):
    from online_stablerep.training.checkpoint import newest_checkpoint

    train(tmp_path, "train.steps=2", "train.checkpoint_every=1")
    (tmp_path / "checkpoints" / "step_00000009.tmp").mkdir()
    (tmp_path / "checkpoints" / "step_00000008").mkdir()  # no meta.json: a crash mid-write
    assert newest_checkpoint(tmp_path).name == "step_00000002"
