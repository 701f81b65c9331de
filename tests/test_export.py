"""`online-stablerep export`: the trained backbone loads in timm alone and gives the checkpoint's
features."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from online_stablerep.config import load_config
from online_stablerep.eval.export import export_encoder, load_trained_model
from online_stablerep.models.encoder import build_model
from online_stablerep.training.checkpoint import newest_checkpoint
from tests.helpers import TINY_PROCEDURAL, run_cli

pytestmark = pytest.mark.slow

# A ViT: its position embedding depends on the image size, which the export must record.
VIT = ["model.backbone=vit_tiny_patch16_224", "model.image_size=32"]

# Runs in a fresh interpreter that never imports the project: only timm and torch.
LOAD_WITH_TIMM = """
import sys, timm, torch
out, images = sys.argv[1], sys.argv[2]
model = timm.create_model("local-dir:" + out, pretrained=True).eval()
assert not any(m.startswith("online_stablerep") for m in sys.modules)
config = timm.data.resolve_data_config({}, model=model)
with torch.no_grad():
    torch.save({"features": model(torch.load(images)), "input_size": config["input_size"],
                "mean": config["mean"], "crop_pct": config["crop_pct"]}, images + ".out")
"""


def _random_encoder(cfg):
    torch.manual_seed(123)
    model = build_model(cfg.model).eval()
    return lambda images: model.encode_image(images).detach()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export_run")
    result = run_cli(["train", "--config", "cpu_procedural", *TINY_PROCEDURAL, *VIT,
                      "train.steps=3", f"output_dir={out}"])
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_exported_backbone_gives_the_checkpoints_features(trained_run, tmp_path):
    checkpoint = newest_checkpoint(trained_run)
    export_dir = tmp_path / "encoder"
    result = run_cli(["export", "--checkpoint", str(checkpoint), "--out", str(export_dir),
                      "--head"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert {p.name for p in export_dir.iterdir()} == {
        "model.safetensors", "config.json", "head.safetensors", "head.json"}

    cfg = load_config(str(trained_run / "config.yaml"), [])
    model = load_trained_model(cfg, checkpoint)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.encode_image(images)
    images_path = tmp_path / "images.pt"
    torch.save(images, images_path)
    subprocess.run([sys.executable, "-c", LOAD_WITH_TIMM, str(export_dir), str(images_path)],
                   check=True, cwd=tmp_path)
    got = torch.load(str(images_path) + ".out")
    torch.testing.assert_close(got["features"], want, rtol=0, atol=1e-5)
    # The training normalisation and crop size travel with the weights.
    assert tuple(got["input_size"]) == (3, 32, 32)
    assert tuple(got["mean"]) == pytest.approx(tuple(cfg.augment.mean))
    assert got["crop_pct"] == 1.0
    # A trained model differs from a random one: the comparison above can fail.
    assert not torch.allclose(want, _random_encoder(cfg)(images), atol=1e-3)
    head = json.loads((export_dir / "head.json").read_text())
    assert head["embed_dim"] == cfg.model.embed_dim


def test_pretrained_cfg_overlay_loads_the_same_weights(trained_run, tmp_path):
    """The other documented way: the timm name plus the exported file as an overlay."""
    import timm

    checkpoint = newest_checkpoint(trained_run)
    cfg = load_config(str(trained_run / "config.yaml"), [])
    export_encoder(cfg, checkpoint, tmp_path / "enc")
    model = timm.create_model(
        cfg.model.backbone, pretrained=True, num_classes=0, img_size=32,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "enc" / "model.safetensors")),
    ).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), load_trained_model(cfg, checkpoint)
                                   .encode_image(images), rtol=0, atol=1e-5)


def _export(argv: list[str]) -> int:
    """The export command in this process (its errors need no fresh interpreter)."""
    from online_stablerep.cli import build_parser
    from online_stablerep.commands import export

    return export.run(build_parser().parse_args(["export", *argv]))


def test_export_names_a_missing_config_and_an_incomplete_checkpoint(tmp_path, capsys):
    lonely = tmp_path / "somewhere" / "checkpoints" / "step_00000001"
    lonely.mkdir(parents=True)
    assert _export(["--checkpoint", str(lonely), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "config.yaml" in err and "--config" in err
    assert _export(["--checkpoint", str(lonely), "--out", str(tmp_path / "o"),
                    "--config", "cpu_procedural"]) == 2
    err = capsys.readouterr().err
    assert "not a complete checkpoint" in err and "meta.json" in err
