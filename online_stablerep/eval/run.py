"""Probe a trained encoder beside an untrained one of the same architecture (and raw pixels)."""

from __future__ import annotations

from pathlib import Path

import torch

from online_stablerep.config import Config
from online_stablerep.eval.datasets import check_probe_data
from online_stablerep.eval.export import load_trained_model
from online_stablerep.eval.probe import probe_encoders, write_probe_json
from online_stablerep.models.encoder import build_model
from online_stablerep.monitoring.metrics import console
from online_stablerep.training import checkpoint as ckpt


def _encoder(model: torch.nn.Module):
    model.eval()
    dtype = next(model.parameters()).dtype

    def encode(images: torch.Tensor) -> torch.Tensor:
        return model.encode_image(images.to(dtype)).float()

    return encode


def probe_model(cfg: Config, model: torch.nn.Module, device: torch.device) -> dict:
    """Probe `model`, a fresh random-init model of the same config, and pixels; write JSON."""
    encoders = {"trained": _encoder(model)}
    if cfg.eval.baselines:
        torch.manual_seed(cfg.seed + 1)
        encoders["random_init"] = _encoder(build_model(cfg.model).to(device))
    with torch.no_grad():
        results = probe_encoders(cfg, encoders, device)
    path = Path(cfg.output_dir) / "probe.json"
    summary = write_probe_json(results, path, suite=cfg.eval.suite)
    console(
        "probe: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if isinstance(v, float))
        + f" -> {path}"
    )
    return summary


def probe_after_training(cfg: Config, model: torch.nn.Module, device: torch.device) -> dict:
    was_training = model.training
    try:
        return probe_model(cfg, model, device)
    finally:
        model.train(was_training)


def probe_checkpoint(cfg: Config, path: Path | None, device: torch.device) -> dict:
    """Probe the model of checkpoint `path` (default: the newest in cfg.output_dir).

    Raises:
        ValueError: no complete checkpoint there, one of another architecture than cfg's, or
            a missing eval.dataset folder (all found before any image is encoded).
    """
    check_probe_data(cfg)
    path = path or ckpt.newest_checkpoint(cfg.output_dir)
    if path is None:
        raise ValueError(f"no complete checkpoint found in {cfg.output_dir}")
    model = load_trained_model(cfg, Path(path)).to(device)
    console(f"probing checkpoint {path}")
    return probe_model(cfg, model, device)
