"""The DeepSpeed engine of the trainer group: precision, the peak learning rate, DeepSpeed's
config, and the engine itself (AdamW, the warm-up cosine schedule, optional compile)."""

from __future__ import annotations

from typing import Any

import deepspeed
import torch

from online_stablerep.config.schema import Config
from online_stablerep.distributed.env import get_world_size
from online_stablerep.distributed.groups import JobGroups, TrainerMPU
from online_stablerep.training.schedule import param_groups, warmup_cosine


def use_bf16(cfg: Config, device: torch.device) -> bool:
    """DeepSpeed's bf16 mode: bf16 weights, activations and gradients, fp32 master weights and
    optimizer state ("bf16", or "auto" on a GPU)."""
    if cfg.train.precision == "auto":
        return device.type == "cuda"
    return cfg.train.precision == "bf16"


def use_autocast(cfg: Config) -> bool:
    """The official structure ("autocast_bf16"): an fp32 engine (weights, gradients, optimizer
    state) with the forward under bf16 autocast (the official code autocasts to fp16 with a
    loss scaler; bf16 needs none)."""
    return cfg.train.precision == "autocast_bf16"


def peak_lr(cfg: Config, trainer_world: int) -> float:
    """optim.lr if set, else the official rule: base_lr x images per step / 256 / 2.

    The official main_stablerep.py scales blr by the global images per step / 256, then by
    num_crop / 2 with num_crop = 1 (its scaling assumed two crops per image); each of our k
    views is one crop of a different image, so base_lr is the official --blr.
    """
    if cfg.optim.lr > 0:
        return cfg.optim.lr
    images = cfg.batch.captions_per_batch * cfg.batch.views_per_caption * trainer_world
    return cfg.optim.base_lr * images / 256 / 2


def deepspeed_config(cfg: Config, rows_per_rank: int, bf16: bool) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": rows_per_rank,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "bf16": {"enabled": bf16},
        "gradient_clipping": cfg.optim.grad_clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(cfg: Config, model: torch.nn.Module, lr: float, groups: JobGroups,
                 rows_per_rank: int, bf16: bool) -> deepspeed.DeepSpeedEngine:
    """The engine over the trainer group only (an mpu keeps it off the world group)."""
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.optim.weight_decay),
        lr=lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        fused=cfg.optim.fused,
    )
    if cfg.train.compile:
        # compile() keeps the module and its parameters (state dicts stay unprefixed).
        model.compile()
    scheduler = warmup_cosine(
        optimizer, cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, rows_per_rank, bf16),
        mpu=TrainerMPU(groups),
        dist_init_required=False,
    )
    if get_world_size(groups.trainer) == 1 and cfg.train.zero_stage == 0:
        # One trainer has no gradients to average: skip the engine's bucketed all-reduce
        # (a flatten, a collective over one rank and an unflatten every step). ZeRO-1
        # needs it: its reduce fills the optimizer's gradient partitions.
        engine.enable_backward_allreduce = False
    return engine
