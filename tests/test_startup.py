"""Start-up verdicts shared across nodes (distributed/startup.py): two gloo processes posing as
two nodes; a failed check on one stops both with its reason."""

from __future__ import annotations

import os

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from online_stablerep.distributed.startup import StartupError, agree_on_startup, several_nodes
from tests.helpers import free_port


def _rank(rank: int, port: int, errors: dict[int, str | None], results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        agree_on_startup(errors[rank], local_world_size=1)
        results.put((rank, "ok", True))
    except StartupError as err:
        results.put((rank, str(err), err.own))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("errors, expected", [
    ({0: None, 1: None}, {0: ("ok", True), 1: ("ok", True)}),
    ({0: None, 1: "input error: generator.model='/models/sd': no such folder"},
     {0: ("start-up failed on rank 1 (node 1): input error: generator.model='/models/sd'",
          False),
      1: ("start-up failed on rank 1 (node 1): input error", True)}),
])
def test_one_nodes_failed_check_stops_every_node_with_its_reason(errors, expected):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, errors, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = {}
    for _ in procs:
        rank, text, own = results.get(timeout=60)
        got[rank] = (text, own)
    for p in procs:
        p.join(timeout=30)
    for rank, (start, own) in expected.items():
        assert got[rank][0].startswith(start) and got[rank][1] == own, got


def test_several_nodes_is_a_world_larger_than_a_node():
    assert several_nodes(4, 2) and not several_nodes(2, 2)
