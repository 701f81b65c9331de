"""Config loading: presets, overrides, and errors that name the key (exit code 2 from the CLI)."""

import pytest

from online_stablerep.cli import main
from online_stablerep.config import ConfigError, load_config, parse_guidance, preset_names
from online_stablerep.config.load import RENAMED


@pytest.mark.parametrize("name", ["cpu_procedural", "cpu_demo", "sd15_vitb16"])
def test_presets_load(name):
    cfg = load_config(name)
    assert cfg.batch.views_per_caption <= cfg.producer.images_per_caption
    assert name in preset_names()


def test_paper_preset():
    cfg = load_config("sd15_vitb16")
    assert cfg.model.backbone == "vit_base_patch16_224" and cfg.model.image_size == 224
    assert cfg.loss.temperature == 0.1
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.weight_decay) == (0.9, 0.98, 0.1)
    assert cfg.optim.base_lr == 2e-4


def test_overrides_apply():
    cfg = load_config("cpu_demo", ["train.steps=7", "output_dir=/tmp/x", "generator.guidance=mixed"])
    assert cfg.train.steps == 7 and cfg.output_dir == "/tmp/x"
    assert parse_guidance(cfg.generator.guidance) == [2, 3, 4, 5, 6, 8, 10, 12]


@pytest.mark.parametrize(
    "override, key",
    [
        ("loss.temperature=0", "loss.temperature"),
        ("loss.temperature=-1", "loss.temperature"),
        ("batch.views_per_caption=1", "batch.views_per_caption"),
        ("batch.views_per_caption=9", "batch.views_per_caption"),
        ("producer.images_per_caption=1", "producer.images_per_caption"),
        ("replay.capacity=2", "replay.capacity"),
        ("loss.tau=0.1", "loss.tau"),
        ("train.steps=many", "train.steps"),
        ("generator.scheduler=magic", "generator.scheduler"),
        ("generator.guidance=lots", "generator.guidance"),
        ("roles.generators=two", "roles.generators"),
        ("train.zero_stage=3", "train.zero_stage"),
        ("augment.grayscale_p=1.5", "augment.grayscale_p"),
        ("shards.image_format=gif", "shards.image_format"),
        ("shards.quality=0", "shards.quality"),
        ("shards.groups_per_shard=0", "shards.groups_per_shard"),
        ("producer.kind=shards", "shards.path"),
        ("mix.prefetch_batches=-1", "mix.prefetch_batches"),
        ("batch.positives=views", "batch.positives"),
        ("eval.suite=procedural1000", "eval.suite"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("cpu_demo", [override])


def test_shards_are_not_written_again():
    with pytest.raises(ConfigError, match=r"shards\.write_dir"):
        load_config("cpu_demo", ["producer.kind=shards", "shards.path=x", "shards.write_dir=y"])


@pytest.mark.parametrize("old, new", list(RENAMED.items()))
def test_renamed_keys_fail_naming_the_new_key(old, new, tmp_path):
    with pytest.raises(ConfigError, match=rf"{old} \(command line\) was renamed {new}"):
        load_config("cpu_demo", [f"{old}=1"])
    section, key = old.split(".")
    path = tmp_path / "old.yaml"
    path.write_text(f"{section}:\n  {key}: 1\n")
    with pytest.raises(ConfigError, match=rf"{old} \({path}\) was renamed {new}"):
        load_config(str(path))


def test_image_positives_need_only_one_image_per_caption():
    # SimCLR positives (batch.positives=image) are k augmentations of one image.
    cfg = load_config("cpu_demo", ["batch.positives=image", "producer.images_per_caption=1"])
    assert cfg.batch.positives == "image" and cfg.producer.images_per_caption == 1
    with pytest.raises(ConfigError, match=r"producer\.images_per_caption"):
        load_config("cpu_demo", ["batch.positives=image", "producer.images_per_caption=0"])



def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="cpu_procedural"):
        load_config("no_such_preset")


def test_cli_exit_code_2_on_bad_config(capsys):
    assert main(["train", "--config", "cpu_demo", "loss.temperature=0"]) == 2
    assert "loss.temperature" in capsys.readouterr().err


def test_guidance_forms():
    assert parse_guidance("small") == [2.0, 3.0]
    assert parse_guidance("large") == [8.0, 10.0]
    assert parse_guidance("2.5") == [2.5]
    assert parse_guidance("2,3, 4") == [2.0, 3.0, 4.0]
