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
    assert "global ranks 0)" in roles.describe() and "global ranks 1-2)" in roles.describe()


def test_two_trainers_one_generator():
    roles = Roles.from_spec("1", world_size=3)
    assert roles.trainer_ranks == [0, 1] and roles.generator_ranks == [2]
    assert roles.generator_index(2) == 0


def test_per_node_puts_k_generators_on_every_node_at_its_last_local_ranks():
    roles = Roles.from_spec("1/node", world_size=8, local_world_size=4)
    assert roles.num_generators == 2 and roles.nodes == 2
    assert roles.trainer_ranks == [0, 1, 2, 4, 5, 6] and roles.generator_ranks == [3, 7]
    assert roles.is_trainer(0) and roles.is_generator(3) and roles.is_trainer(4)
    assert [roles.producer_shard(g) for g in (3, 7)] == [(0, 2), (1, 2)]
    assert roles.preferred_trainers(7) == [4, 5, 6] and roles.preferred_generators(1) == [3]
    assert "on every node local ranks 0-2 train and 3 generate" in roles.describe()


def test_two_nodes_of_two_ranks_one_generator_each():
    # The layout of tests/test_multinode.py.
    roles = Roles.from_spec("1/node", world_size=4, local_world_size=2)
    assert roles.trainer_ranks == [0, 2] and roles.generator_ranks == [1, 3]
    assert [roles.node_of(g) for g in roles.generator_ranks] == [0, 1]
    assert roles.preferred_trainers(3) == [2] and roles.preferred_generators(2) == [3]


def test_every_node_holds_its_trainers_and_generators_at_scale():
    roles = Roles.from_spec("2/node", world_size=1000, local_world_size=8)
    assert roles.nodes == 125 and roles.num_generators == 250 and roles.num_trainers == 750
    assert roles.is_trainer(0)
    for node in (0, 61, 124):
        ranks = range(node * 8, node * 8 + 8)
        assert [r for r in ranks if roles.is_generator(r)] == [node * 8 + 6, node * 8 + 7]
        assert roles.preferred_trainers(node * 8 + 7) == list(range(node * 8, node * 8 + 6))
    assert roles.generator_index(15) == 3 and roles.producer_shard(999) == (249, 250)
    assert "0-5,8-13" in roles.describe() and "more runs" in roles.describe()


def test_a_total_count_keeps_generators_on_the_highest_ranks_and_prefers_no_node():
    roles = Roles.from_spec("2", world_size=8, local_world_size=4)
    assert roles.trainer_ranks == list(range(6)) and roles.generator_ranks == [6, 7]
    # Node 0 has no generator: its trainers would starve if generators kept to node 1.
    assert roles.preferred_trainers(6) == roles.trainer_ranks
    assert roles.preferred_generators(0) == [6, 7]


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
