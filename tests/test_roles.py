"""Roles.from_spec: which rank does what, without any process group."""

from __future__ import annotations

import pytest

from online_stablerep.config.validate import ConfigError
from online_stablerep.distributed.roles import Roles


def test_colocated_every_rank_trains():
    roles = Roles.from_spec("0", world_size=4)
    assert roles.colocated and roles.trainer_ranks == [0, 1, 2, 3] and roles.generator_ranks == []
    assert roles.producer_shard(2) == (2, 4)


def test_trainers_take_the_lowest_ranks():
    roles = Roles.from_spec("2", world_size=3)
    assert roles.trainer_ranks == [0] and roles.generator_ranks == [1, 2]
    assert roles.is_trainer(0) and not roles.is_trainer(1) and roles.is_generator(2)
    assert [roles.producer_shard(r) for r in (1, 2)] == [(0, 2), (1, 2)]
    assert "trainers 0..0" in roles.describe()


def test_two_trainers_one_generator():
    roles = Roles.from_spec("1", world_size=3)
    assert roles.trainer_ranks == [0, 1] and roles.generator_ranks == [2]
    assert roles.generator_index(2) == 0


def test_per_node_count_scales_with_nodes():
    roles = Roles.from_spec("1/node", world_size=8, local_world_size=4)
    assert roles.num_generators == 2 and roles.trainer_ranks == list(range(6))


@pytest.mark.parametrize(
    ("spec", "world", "local", "message"),
    [
        ("3", 3, None, "leaves no trainer"),
        ("5", 3, None, "leaves no trainer"),
        ("2/node", 4, 2, "leaves no trainer"),
        ("1/node", 6, 4, "not a multiple"),
        ("two", 3, None, "roles.generators"),
        ("-1", 3, None, "roles.generators"),
    ],
)
def test_invalid_layouts_fail_naming_the_key(spec, world, local, message):
    with pytest.raises(ConfigError, match=message):
        Roles.from_spec(spec, world_size=world, local_world_size=local)


def test_local_world_size_reads_the_deepspeed_launchers_local_size(monkeypatch):
    from online_stablerep.distributed.env import local_world_size

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    assert local_world_size(4) == 4
    monkeypatch.setenv("LOCAL_SIZE", "2")  # what `deepspeed` sets on each node
    assert local_world_size(4) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # torchrun
    assert local_world_size(4) == 3
