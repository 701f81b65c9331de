"""Hand the trained encoder over: the backbone as timm's own safetensors + config.json layout, so
`timm.create_model("local-dir:DIR", pretrained=True)` rebuilds it with no project code."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from timm.models import save_for_hf

from online_stablerep.config import Config
from online_stablerep.models.encoder import StableRepModel, build_model
from online_stablerep.training import checkpoint as ckpt

HEAD_FILE = "head.safetensors"
HEAD_CONFIG = "head.json"


def run_config_of(checkpoint: Path) -> Path:
    """The config.yaml a job wrote beside its checkpoints (output_dir/checkpoints/step_N)."""
    return Path(checkpoint).resolve().parent.parent / "config.yaml"


def load_trained_model(cfg: Config, checkpoint: Path) -> StableRepModel:
    """The model of a complete checkpoint folder, on the CPU, in eval mode.

    Raises:
        ValueError: the folder is not a complete checkpoint, or its weights do not fit the
            config's architecture (the message names the first mismatching key).
    """
    problem = ckpt.verify_checkpoint(Path(checkpoint))
    if problem is not None:
        raise ValueError(f"{checkpoint} is not a complete checkpoint: {problem}")
    model = build_model(cfg.model)
    state = torch.load(Path(checkpoint) / "model.pt", map_location="cpu", weights_only=False)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"checkpoint {checkpoint} does not match model.backbone={cfg.model.backbone!r} "
            f"(pass the run's --config): {str(err).splitlines()[1].strip()}"
        ) from None
    return model.eval()


def export_encoder(cfg: Config, checkpoint: Path, out: Path, head: bool = False) -> list[Path]:
    """Write the backbone of `checkpoint` to `out` (model.safetensors + config.json); with
    `head`, also the projection head's weights and the sizes it was built with.

    The preprocessing recorded is the training normalisation and crop size, so timm's
    `resolve_data_config` gives what the encoder expects.

    Returns:
        The files written.
    """
    model = load_trained_model(cfg, checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    size = cfg.model.image_size
    # crop_pct 1: the probes resize the shorter side to the size and centre-crop it whole.
    data_config = {"input_size": (3, size, size), "mean": tuple(cfg.augment.mean),
                   "std": tuple(cfg.augment.std), "crop_pct": 1.0}
    # timm records the arguments its factory saw (img_size for ViTs): the same call rebuilds it.
    save_for_hf(model.backbone, str(out), safe_serialization=True, data_config=data_config)
    written = [out / "model.safetensors", out / "config.json"]
    if head:
        # The head is this project's module (BatchNorm per view chunk); its weights go beside
        # the sizes needed to rebuild it, for users who continue contrastive training.
        tensors = {k: v.contiguous() for k, v in model.head.state_dict().items()}
        save_file(tensors, str(out / HEAD_FILE))
        (out / HEAD_CONFIG).write_text(json.dumps({
            "kind": cfg.model.head, "in_dim": model.backbone.num_features,
            "hidden_dim": cfg.model.head_hidden_dim, "embed_dim": cfg.model.embed_dim,
        }, indent=2))
        written += [out / HEAD_FILE, out / HEAD_CONFIG]
    return written
