"""The commands that read a finished run's checkpoint, in one process on a checkpoint saved
here (the job-level versions, on a trained checkpoint, are in test_export.py and the job tests):
`export` writes the backbone and head, `probe` writes probe.json."""

import json

import torch
from safetensors.torch import load_file

from online_stablerep.cli import main
from online_stablerep.config import load_config, save_config
from online_stablerep.models.encoder import build_model
from online_stablerep.training.checkpoint import save_checkpoint

OVERRIDES = ["model.backbone=resnet10t", "model.image_size=24", "model.head_hidden_dim=32",
             "model.embed_dim=16", "producer.output_size=32", "procedural.num_categories=4",
             "procedural.render_size=32", "procedural.num_points=500", "eval.train_per_class=3",
             "eval.test_per_class=2", "eval.epochs=3", "eval.lrs=[0.1]",
             "eval.weight_decays=[0.0]", "eval.knn_k=3", "eval.baselines=false"]


def saved_run(tmp_path):
    """A run folder holding config.yaml and one complete checkpoint of a fresh model."""
    cfg = load_config("cpu_procedural", [f"output_dir={tmp_path}", *OVERRIDES])
    save_config(cfg, tmp_path / "config.yaml")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    path = save_checkpoint(tmp_path, 1, model.state_dict(), {"step": 1}, None, keep=1)
    return path, model


def test_export_writes_the_checkpoints_backbone_and_head(tmp_path, capsys):
    path, model = saved_run(tmp_path / "run")
    out = tmp_path / "encoder"
    assert main(["export", "--checkpoint", str(path), "--out", str(out), "--head"]) == 0
    assert "local-dir:" in capsys.readouterr().out
    saved = load_file(str(out / "model.safetensors"))
    expected = model.backbone.state_dict()
    assert saved.keys() == expected.keys()
    for key, tensor in saved.items():
        torch.testing.assert_close(tensor, expected[key])
    assert json.loads((out / "head.json").read_text())["embed_dim"] == 16


def test_export_without_the_runs_config_exits_2(tmp_path, capsys):
    path, _ = saved_run(tmp_path / "run")
    (tmp_path / "run" / "config.yaml").unlink()
    assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "e")]) == 2
    assert "config.yaml" in capsys.readouterr().err


def test_probe_writes_the_checkpoints_probe_results(tmp_path):
    run = tmp_path / "run"
    path, _ = saved_run(run)
    assert main(["probe", "--config", str(run / "config.yaml"), "--checkpoint", str(path)]) == 0
    summary = json.loads((run / "probe.json").read_text())
    assert 0.0 <= summary["linear_top1"] <= 1.0 and "linear_top1_pixels" in summary
