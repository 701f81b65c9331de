"""Checkpoint folders in one process: manifest, verification and fallback, leftovers of killed
saves, re-saves of a step, and a full disk."""

import errno
import json
import shutil

import pytest
import torch

from online_stablerep.training import checkpoint as ckpt
from online_stablerep.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    newest_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)


def save(out, step, keep=3, value=0.0):
    return save_checkpoint(out, step, {"w": torch.full((64,), value)}, {"step": step}, None,
                           keep=keep)


def names(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_manifest_records_every_file_and_verifies(tmp_path):
    path = save(tmp_path, 1)
    files = json.loads((path / "meta.json").read_text())["files"]
    assert set(files) == {"model.pt", "rank0.pt"}
    assert files["model.pt"]["bytes"] == (path / "model.pt").stat().st_size
    assert verify_checkpoint(path) is None


def test_truncated_newest_checkpoint_falls_back_to_the_previous_with_a_warning(tmp_path):
    save(tmp_path, 1, value=1.0)
    newest = save(tmp_path, 2, value=2.0)
    data = (newest / "model.pt").read_bytes()
    (newest / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="step_00000002: model.pt is .* bytes"):
        path = newest_checkpoint(tmp_path)
    assert path.name == "step_00000001"
    model, state, _ = load_checkpoint(path, 0, 1)
    assert model["w"][0] == 1.0 and state["step"] == 1


def test_no_valid_checkpoint_fails_naming_the_folder_and_what_to_do(tmp_path):
    path = save(tmp_path, 1)
    (path / "rank0.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="step_00000001: rank0.pt .*move the damaged"):
        newest_checkpoint(tmp_path)


def test_leftover_tmp_with_meta_does_not_break_pruning(tmp_path):
    save(tmp_path, 1)
    # A kill between writing meta.json and the rename leaves this behind.
    leftover = tmp_path / "checkpoints" / "step_00000002.tmp"
    shutil.copytree(tmp_path / "checkpoints" / "step_00000001", leftover)
    (tmp_path / "checkpoints" / "step_00000001.old").mkdir()
    for step in (3, 4, 5):
        save(tmp_path, step, keep=2)
    assert names(tmp_path) == ["step_00000004", "step_00000005"]


def test_a_complete_tmp_folder_is_a_checkpoint_to_resume_from(tmp_path):
    save(tmp_path, 1)
    done = tmp_path / "checkpoints" / "step_00000001"
    done.rename(done.with_name("step_00000001.tmp"))  # killed between the renames
    assert newest_checkpoint(tmp_path).name == "step_00000001.tmp"


def test_resave_of_a_step_keeps_a_complete_copy_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    save(tmp_path, 1, value=1.0)
    seen = []
    rename = type(tmp_path).rename

    def watch(self, target):
        # At every rename some complete copy of step 1 exists.
        seen.append(any(verify_checkpoint(p) is None
                        for p in (tmp_path / "checkpoints").iterdir()))
        return rename(self, target)

    monkeypatch.setattr(type(tmp_path), "rename", watch)
    save(tmp_path, 1, value=7.0)
    assert seen and all(seen)
    assert names(tmp_path) == ["step_00000001"]
    assert load_checkpoint(newest_checkpoint(tmp_path), 0, 1)[0]["w"][0] == 7.0


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4054"),
])
def test_full_disk_names_the_path_and_removes_the_partial_folder(tmp_path, monkeypatch, error):
    save(tmp_path, 1)
    real_save = torch.save

    def full(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        raise error

    monkeypatch.setattr(ckpt.torch, "save", full)
    with pytest.raises(CheckpointError) as info:
        save(tmp_path, 2)
    assert "no space left on device" in str(info.value)
    assert "step_00000002.tmp" in str(info.value)
    assert names(tmp_path) == ["step_00000001"]


def test_other_write_errors_are_not_reported_as_a_full_disk(tmp_path, monkeypatch):
    def denied(obj, path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(ckpt.torch, "save", denied)
    with pytest.raises(PermissionError):
        save(tmp_path, 1)
