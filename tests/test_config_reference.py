"""The config reference (docs/config.md) is generated from the schema and kept fresh; `config
show` prints the resolved config; `train --help` lists the presets and points to the reference."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from online_stablerep.cli import main
from online_stablerep.config import load_config, preset_names, to_yaml
from online_stablerep.config.reference import COMMAND, keys, render

REFERENCE = Path(__file__).parents[1] / "docs" / "config.md"


@pytest.fixture(scope="module")
def text() -> str:
    return render()


def test_the_reference_is_up_to_date(text):
    assert REFERENCE.read_text() == text, f"docs/config.md is stale; regenerate it: {COMMAND}"


def test_every_key_has_a_meaning_and_a_row(text):
    missing = [key.name for key in keys() if not key.doc]
    assert not missing, f"fields without a comment above them in schema.py: {missing}"
    for key in keys():
        assert f"| `{key.name}` |" in text


def test_the_reference_has_every_key_of_a_resolved_config():
    resolved = OmegaConf.to_container(OmegaConf.create(to_yaml(load_config())))
    flat = {f"{section}.{k}" if isinstance(v, dict) else section
            for section, v in resolved.items() for k in (v if isinstance(v, dict) else [None])}
    assert flat == {key.name for key in keys()}


def test_the_presets_are_columns_with_their_values(text):
    header = next(line for line in text.splitlines() if line.startswith("| key |"))
    assert all(f"`{name}`" in header for name in preset_names())
    # cpu_procedural sets model.backbone; sd15_vitb16 keeps the default (an empty cell).
    row = next(line for line in text.splitlines() if line.startswith("| `model.backbone` |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    columns = dict(zip(preset_names(), cells[4:], strict=True))
    assert columns["cpu_procedural"] == '`"resnet10t"`' and columns["sd15_vitb16"] == ""
    assert cells[2] == '`"vit_base_patch16_224"`'


def test_config_show_prints_the_resolved_config(capsys):
    assert main(["config", "show", "--config", "cpu_procedural", "train.steps=7"]) == 0
    shown = capsys.readouterr().out
    assert shown == to_yaml(load_config("cpu_procedural", ["train.steps=7"]))
    assert OmegaConf.create(shown).train.steps == 7


def test_config_show_defaults_to_trains_preset(capsys):
    assert main(["config", "show"]) == 0
    assert capsys.readouterr().out == to_yaml(load_config("cpu_demo"))


def test_config_show_names_a_bad_key(capsys):
    assert main(["config", "show", "train.stepz=7"]) == 2
    assert "train.stepz" in capsys.readouterr().err


def test_train_help_lists_presets_and_points_to_the_reference(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in preset_names())
    assert "docs/config.md" in text and "config show" in text
