"""The schedule in the official units: steps and warm-up from passes over the caption corpus,
the trainer count and the batch (config/schedule.py); reuse per image; the job prints both and
records the resolved steps in config.yaml."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from online_stablerep.config import ConfigError, load_config
from online_stablerep.config.schedule import resolve_schedule, steps_per_epoch, uses_per_image
from online_stablerep.distributed.roles import Roles
from online_stablerep.jobs.preflight import InputError, job_schedule
from tests.helpers import TINY_PROCEDURAL, run_cli


def test_a_pass_counts_steps_as_the_official_loader():
    # DistributedSampler pads the corpus to ceil(N / ranks) per rank; drop_last drops the rest.
    assert steps_per_epoch(10_000_000, 32, 43) == math.ceil(10_000_000 / 32) // 43 == 7267
    assert steps_per_epoch(100, 3, 10) == 3  # ceil(100 / 3) = 34 -> 3 full batches


def test_sd15_preset_is_109k_steps_only_at_32_ranks_and_10m_captions():
    cfg = load_config("sd15_vitb16")
    assert (cfg.train.steps, cfg.optim.warmup_steps) == (0, 0)
    official = resolve_schedule(cfg, 10_000_000, 32)
    assert official.steps == 15 * 7267 == 109_005 and official.warmup_steps == round(7267 / 2)
    assert official.epochs == pytest.approx(15.0)
    # One 8-GPU node trains the same 15 passes: four times the steps of a quarter the batch.
    node = resolve_schedule(cfg, 10_000_000, 8)
    assert node.steps == 15 * (1_250_000 // 43) and node.steps > 4 * official.steps - 60
    # CC3M's 2.7M captions on 32 ranks: about 29k steps.
    cc3m = resolve_schedule(cfg, 2_700_000, 32)
    assert 29_000 < cc3m.steps < 29_500 and cc3m.warmup_steps == round(cc3m.steps / 30)


def test_explicit_steps_win_and_warmup_keeps_its_share():
    cfg = load_config("sd15_vitb16", ["train.steps=3000"])
    schedule = resolve_schedule(cfg, 10_000_000, 32)
    assert (schedule.steps, schedule.warmup_steps) == (3000, 100)  # 0.5 / 15 of 3000
    assert schedule.steps_from == "train.steps" and schedule.epochs == pytest.approx(3000 / 7267)
    fixed = resolve_schedule(load_config("sd15_vitb16", ["optim.warmup_steps=7"]), 10_000_000, 32)
    assert fixed.warmup_steps == 7 and fixed.steps == 109_005
    # The same 3x schedule in passes: --epochs 45 --warmup_epochs 1.5.
    three = resolve_schedule(load_config("sd15_vitb16", ["train.schedule_epochs=45",
                                                         "train.warmup_epochs=1.5"]), 10_000_000, 32)
    assert three.steps == 45 * 7267 and three.warmup_steps == round(1.5 * 7267)


def test_real_groups_do_not_count_as_corpus_passes(tmp_path):
    (tmp_path / "cls").mkdir()
    cfg = load_config("sd15_vitb16", ["mix.real_fraction=0.25", f"mix.real_path={tmp_path}"])
    # 11 of 43 groups are real images: 32 generated captions a step per rank.
    assert resolve_schedule(cfg, 1_000_000, 4).groups_per_step == 32 * 4


def test_a_schedule_that_cannot_come_from_the_corpus_names_train_steps():
    cfg = load_config("sd15_vitb16")
    with pytest.raises(ConfigError, match=r"train\.steps"):
        resolve_schedule(cfg, 0, 8)  # stored shards: not counted
    with pytest.raises(ConfigError, match=r"train\.steps"):
        resolve_schedule(cfg, 300, 8)  # less than one global batch of 8 x 43
    assert resolve_schedule(load_config("sd15_vitb16", ["train.steps=5"]), 0, 8).steps == 5
    shards = load_config("sd15_vitb16", ["producer.kind=shards", "shards.path=x"])
    with pytest.raises(InputError, match=r"train\.steps"):
        job_schedule(shards, Roles.from_spec("0", 8, 8))


@pytest.mark.parametrize("override, key", [
    ("train.steps=-1", "train.steps"),
    ("train.schedule_epochs=-1", "train.schedule_epochs"),
    ("train.schedule_epochs=0", "train.schedule_epochs"),
    ("train.warmup_epochs=20", "train.warmup_epochs"),
])
def test_bad_schedule_keys_fail_at_load(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("sd15_vitb16", [override])


def test_preset_reuse_is_the_official_nine_uses_per_image():
    cfg = load_config("sd15_vitb16")
    assert cfg.replay.max_reuse == 15 and uses_per_image(cfg) == pytest.approx(9.0)
    assert uses_per_image(load_config("sd15_vitb16", ["replay.max_reuse=9"])) == pytest.approx(5.4)


@pytest.mark.slow
def test_job_prints_the_schedule_and_records_it_in_config_yaml(tmp_path: Path):
    out = tmp_path / "run"
    # 20 categories, 8 a step on one trainer: 2 steps a pass; 3 passes, warm-up 1 pass.
    result = run_cli(["train", "--config", "cpu_procedural", *TINY_PROCEDURAL,
                      "optim.warmup_steps=0", "train.steps=0", "train.schedule_epochs=3",
                      "train.warmup_epochs=1", "train.checkpoint_every=0", f"output_dir={out}"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    text = result.stdout + result.stderr
    assert "schedule: 6 steps from train.schedule_epochs, warm-up 2 steps" in text
    assert "3.00 passes over 20 captions" in text
    assert "uses per stored image" in text
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["train"]["steps"], saved["optim"]["warmup_steps"]) == (6, 2)
    assert saved["train"]["schedule_epochs"] == 3
