"""The paper's training preset: the official learning-rate rule, weight decay groups and the
sd15_vitb16 preset against the official README's command."""

from __future__ import annotations

import pytest
import timm
import torch

from online_stablerep.config import load_config
from online_stablerep.training.engine import peak_lr
from online_stablerep.training.schedule import param_groups


def test_sd15_preset_peak_lr_on_32_trainer_ranks_is_the_official_one() -> None:
    # main_stablerep.py: blr * (43 * 32) * 6 / 256 * num_crop / 2 with blr 2e-4, num_crop 1.
    cfg = load_config("sd15_vitb16")
    assert peak_lr(cfg, trainer_world=32) == pytest.approx(3.225e-3)


def test_absolute_lr_overrides_the_rule() -> None:
    cfg = load_config("sd15_vitb16", ["optim.lr=0.01"])
    assert peak_lr(cfg, trainer_world=32) == 0.01


def test_sd15_preset_follows_the_official_command() -> None:
    cfg = load_config("sd15_vitb16")
    assert cfg.model.drop_path_rate == 0.0
    assert cfg.augment.downsample_p == 0.05 and list(cfg.augment.downsample_sizes) == [64, 128]
    assert (cfg.train.schedule_epochs, cfg.train.warmup_epochs) == (15, 0.5)
    assert cfg.optim.weight_decay == 0.1 and (cfg.optim.beta1, cfg.optim.beta2) == (0.9, 0.98)


def test_weight_decay_groups_match_the_official_rule() -> None:
    # add_weight_decay: no decay for tensors with fewer than 2 dims or biases; the ViT's
    # position embedding and class token (3-D) are decayed.
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32)
    model.logit_scale = torch.nn.Parameter(torch.tensor(1.0))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_embed", "cls_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"} <= decayed
    assert {"logit_scale", "norm.weight", "blocks.0.attn.qkv.bias"} <= skipped
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
