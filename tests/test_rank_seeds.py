"""Trainer ranks start from identical weights but each draws its own random streams (drop
path and the like) from seed + rank, as the official code seeds them. Two real gloo ranks."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from tests.helpers import TINY_PROCEDURAL, free_port

pytestmark = pytest.mark.slow


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    from online_stablerep.config import load_config
    from online_stablerep.distributed.groups import create_groups, init_with_deepspeed
    from online_stablerep.distributed.roles import Roles
    from online_stablerep.jobs.trainer_rank import trainer_source
    from online_stablerep.training.trainer import Trainer

    cfg = load_config("cpu_procedural", [*TINY_PROCEDURAL, f"output_dir={out}"])
    device = torch.device("cpu")
    init_with_deepspeed(device, 60)
    roles = Roles.from_spec("0", 2, 2)
    groups = create_groups(roles, device, 60)
    trainer = Trainer(cfg, groups, trainer_source(cfg, roles, groups, rank, device), device)
    weights = torch.cat([p.detach().flatten() for p in trainer.engine.module.parameters()])
    torch.save({"weights": weights, "draw": torch.rand(16)}, f"{out}/rank{rank}.pt")
    trainer.source.close()


def test_ranks_share_initial_weights_and_draw_their_own_random_streams(tmp_path):
    mp.start_processes(_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["weights"], r1["weights"])
    assert not torch.equal(r0["draw"], r1["draw"])
