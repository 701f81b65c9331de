"""Generator ranks feed trainer ranks through the real transport: separate processes on gloo,
the procedural producer, and the trainer's HybridSource drawing batches until the stream ends.

Every group a trainer receives is recorded (key and a hash of its images) and compared with
what the same producers make in this process, so a lost, repeated or altered group fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from online_stablerep.config.schema import Config
from online_stablerep.distributed.groups import create_groups, init_distributed
from online_stablerep.distributed.roles import Roles
from online_stablerep.jobs.generator import run_generator
from online_stablerep.producers.procedural import ProceduralProducer
from online_stablerep.records import CaptionGroup
from online_stablerep.replay import ReplayBuffer
from online_stablerep.training.hybrid_source import build_hybrid_source
from tests.helpers import free_port

pytestmark = pytest.mark.slow
JOIN_TIMEOUT_S = 60


def small_config(timeout_s: float = 20.0, **transport) -> Config:
    cfg = Config()
    cfg.producer.kind = "procedural"
    cfg.producer.images_per_caption = 2
    cfg.producer.output_size = 8
    # 3 captions per call against 2 credits: calls are split across messages and trainers.
    cfg.producer.captions_per_call = 3
    cfg.procedural.num_categories = 18
    cfg.procedural.render_size = 8
    cfg.procedural.num_points = 64
    cfg.train.epochs = 1
    cfg.batch.captions_per_batch = 2
    cfg.batch.views_per_caption = 2
    cfg.replay.capacity = 6
    cfg.replay.max_reuse = 1
    cfg.transport.credits_per_generator = 2
    cfg.transport.timeout_s = timeout_s
    for key, value in transport.items():
        setattr(cfg.transport, key, value)
    return cfg


def group_record(group: CaptionGroup) -> list:
    digest = hashlib.sha1(group.images_kchw.numpy().tobytes()).hexdigest()
    return [group.caption_id, group.epoch, group.producer_rank, group.caption, digest]


class RecordingBuffer(ReplayBuffer):
    """The real replay buffer, also recording every group it receives and checking the credit
    bound (unused groups never exceed capacity) at each arrival."""

    def __init__(self, capacity: int, max_reuse: int) -> None:
        super().__init__(capacity, max_reuse)
        self.received: list[list] = []
        self.max_unused = 0

    def add(self, groups: list[CaptionGroup]) -> None:
        unused = self.capacity - self.room() + len(groups)  # held never drawn, then these
        self.max_unused = max(self.max_unused, unused)
        self.received.extend(group_record(g) for g in groups)
        super().add(groups)


class FaultyProducer(ProceduralProducer):
    """The procedural producer that raises, or kills its own process, on call `at_call`."""

    def __init__(self, *args, fault: str, at_call: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fault, self.at_call, self.calls = fault, at_call, 0

    def next_groups(self) -> list[CaptionGroup]:
        self.calls += 1
        if self.calls == self.at_call:
            if self.fault == "raise":
                raise RuntimeError("renderer exploded")
            os.kill(os.getpid(), signal.SIGKILL)
        return super().next_groups()


def _worker(rank: int, world: int, spec: str, port: int, cfg: Config, out: str, plan: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = torch.device("cpu")
    roles = Roles.from_spec(spec, world)
    init_distributed(device, cfg.transport.timeout_s)
    groups = create_groups(roles, device, cfg.transport.timeout_s)
    result: dict = {"rank": rank}
    code = 0
    try:
        if roles.is_trainer(rank):
            buffer = RecordingBuffer(cfg.replay.capacity, cfg.replay.max_reuse)
            source = build_hybrid_source(cfg, groups, buffer)
            try:
                if plan.get("abort_before_start"):
                    source.abort(plan["abort_before_start"])
                    raise RuntimeError(plan["abort_before_start"])
                if plan.get("resume"):
                    source.load_state_dict(plan["resume"][str(rank)])
                steps = 0
                while steps < plan.get("max_steps", 10**9):
                    batch = source.next_batch()
                    if batch is None:
                        break
                    assert len(set(batch.caption_ids.tolist())) == cfg.batch.captions_per_batch
                    steps += 1
                    time.sleep(plan.get("step_s", 0.0))
                result["steps"] = steps
                result["metrics"] = source.metrics()
                result["counters"] = source.receiver.counters()
            finally:
                source.close()
                result.update(received=buffer.received, max_unused=buffer.max_unused,
                              evicted_unused=buffer.evicted_unused, state=source.state_dict())
        else:
            shard, shards = roles.producer_shard(rank)
            fault = plan.get("fault", {})
            if fault.get("rank") == rank:
                def make_producer():
                    return FaultyProducer(cfg, shard, shards, rank, fault=fault["kind"],
                                          at_call=fault["at_call"], max_epochs=cfg.train.epochs)
            else:
                def make_producer():
                    return ProceduralProducer(cfg, shard, shards, rank, cfg.train.epochs)
            result["rc"] = run_generator(cfg, groups, make_producer)
    except Exception as err:
        result["error"] = str(err)
        code = 1
    # Like the job entry: the groups are torn down even after a failure (must not hang).
    dist.destroy_process_group()
    result["time"] = time.time()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    os._exit(code)



def run_job(tmp: Path, spec: str, world: int, cfg: Config, plan: dict) -> dict:
    """Run one job; returns {"codes": exit codes by rank, "results": by rank, "seconds"}."""
    tmp.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, spec, port, cfg, str(tmp), plan))
             for r in range(world)]
    start = time.time()
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=max(1.0, JOIN_TIMEOUT_S - (time.time() - start)))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"ranks {hung} still running after {JOIN_TIMEOUT_S} s"
    results = {}
    for r in range(world):
        path = tmp / f"rank{r}.json"
        results[r] = json.loads(path.read_text()) if path.exists() else {}
    return {"codes": [p.exitcode for p in procs], "results": results, "start": start}


def expected_records(cfg: Config, roles: Roles) -> list[list]:
    """Every group the generators' shards make over the run, made in this process."""
    records = []
    for rank in roles.generator_ranks:
        producer = ProceduralProducer(cfg, *roles.producer_shard(rank), rank, cfg.train.epochs)
        while groups := producer.next_groups():
            records.extend(group_record(g) for g in groups)
    return records


def received(results: dict, roles: Roles) -> list[list]:
    return [rec for t in roles.trainer_ranks for rec in results[t]["received"]]


def as_counter(records: list[list]) -> Counter:
    return Counter(tuple(r) for r in records)


def test_every_group_arrives_once_and_intact(tmp_path):
    # One trainer, two generators; two trainers and one generator run in the resume test.
    spec, world = "2", 3
    cfg = small_config()
    roles = Roles.from_spec(spec, world)
    job = run_job(tmp_path, spec, world, cfg, {"step_s": 0.01})
    assert job["codes"] == [0] * world, job["results"]
    got = received(job["results"], roles)
    # Ids, captions and image bits equal what the producers make; nothing lost or repeated.
    assert as_counter(got) == as_counter(expected_records(cfg, roles))
    for t in roles.trainer_ranks:
        res = job["results"][t]
        # Credit bounds the buffer: unused groups never exceed capacity, none evicted unused.
        assert res["max_unused"] <= cfg.replay.capacity and res["evicted_unused"] == 0
        # END ended the stream: the trainer drew every batch its groups could fill.
        assert res["steps"] == len(res["received"]) // cfg.batch.captions_per_batch
        # The transport counted every received group's pixels (plus captions and headers),
        # per generator, and its rate is that traffic over the run.
        counters, pixels = res["counters"], 3 * cfg.producer.output_size**2
        k = cfg.producer.images_per_caption
        assert counters["bytes"] > len(res["received"]) * k * pixels
        per_generator = Counter(str(record[2]) for record in res["received"])
        assert counters["groups"] == dict(per_generator)
        assert counters["images"] == {g: n * k for g, n in per_generator.items()}
        assert res["metrics"]["transport/MB_per_s"] > 0
        assert all(f"gen/images_per_s/rank{g}" in res["metrics"] for g in roles.generator_ranks)
    assert all(job["results"][g]["rc"] == 0 for g in roles.generator_ranks)


def test_generator_failure_names_the_rank(tmp_path):
    cfg = small_config()
    job = run_job(tmp_path, "2", 3, cfg, {"fault": {"rank": 2, "kind": "raise", "at_call": 2}})
    trainer, other, failed = (job["results"][r] for r in range(3))
    assert job["codes"] == [1, 1, 1], job["results"]
    assert "generator rank 2 failed" in trainer["error"]
    assert "renderer exploded" in trainer["error"]
    assert "renderer exploded" in failed["error"]
    # The healthy generator is stopped with the trainer's reason and exits non-zero too.
    assert "trainer rank 0 aborted" in other["error"] and "generator rank 2" in other["error"]


def test_killed_generator_fails_every_rank_in_time(tmp_path):
    timeout_s = 8.0
    cfg = small_config(timeout_s=timeout_s)
    cfg.procedural.num_categories = 300  # a stream long enough to be mid-run at the kill
    job = run_job(tmp_path, "2", 3, cfg, {"fault": {"rank": 1, "kind": "kill", "at_call": 3},
                                          "step_s": 0.05})
    trainer, _, other = (job["results"][r] for r in range(3))
    assert job["codes"][1] == -signal.SIGKILL
    assert job["codes"][0] == 1 and job["codes"][2] == 1, job["results"]
    assert "generator rank 1" in trainer["error"], trainer["error"]
    assert "generator rank 1" in other["error"], other["error"]
    # Every rank ended within the timeout (plus process start-up) of the kill.
    assert max(trainer["time"], other["time"]) - job["start"] < 2 * timeout_s + 15


def test_resume_continues_after_the_last_received_group(tmp_path):
    # Two trainers and one generator: calls of 3 groups on 2 credits are split across both
    # trainers, so each trainer's checkpoint holds a different cursor and the generator must
    # continue after the newer one, mid-call if that is where it stood.
    cfg = small_config()
    roles = Roles.from_spec("1", 3)
    first = run_job(tmp_path / "first", "1", 3, cfg, {"max_steps": 2})
    assert first["codes"] == [0, 0, 0], first["results"]
    state = {str(t): first["results"][t]["state"] for t in roles.trainer_ranks}
    second = run_job(tmp_path / "second", "1", 3, cfg, {"resume": state})
    assert second["codes"] == [0, 0, 0], second["results"]
    for job in (first, second):
        # No trainer starved while the other filled up.
        assert all(job["results"][t]["received"] for t in roles.trainer_ranks)
        assert all(job["results"][t]["evicted_unused"] == 0 for t in roles.trainer_ranks)
    both = received(first["results"], roles) + received(second["results"], roles)
    # The first job's received groups (used or still buffered) plus the second job's are the
    # whole stream, intact: the resumed generator repeated nothing and skipped nothing.
    assert as_counter(both) == as_counter(expected_records(cfg, roles))


def test_trainer_abort_before_start_stops_generators(tmp_path):
    # A trainer that fails before its first batch (e.g. building its model) never said hello.
    cfg = small_config()
    job = run_job(tmp_path, "2", 3, cfg, {"abort_before_start": "model build failed"})
    assert job["codes"] == [1, 1, 1], job["results"]
    for g in (1, 2):
        assert "trainer rank 0 aborted: model build failed" in job["results"][g]["error"]


def test_resume_mid_call_redoes_the_call_and_drops_delivered_groups(tmp_path):
    # A checkpoint taken after 1 of the 3 groups of call 3 arrived: the generator must redo
    # call 3 from the cursor before it and send only its last 2 groups, then carry on.
    cfg = small_config()
    roles = Roles.from_spec("1", 2)
    producer = ProceduralProducer(cfg, 0, 1, 1)
    made = [group_record(g) for g in producer.next_groups() + producer.next_groups()]
    record = {"seq": 3, "end": 1, "len": 3, "before": producer.state_dict(), "after": None}
    made += [group_record(g) for g in producer.next_groups()[:1]]
    job = run_job(tmp_path, "1", 2, cfg, {"resume": {"0": {"cursors": {"1": record}}}})
    assert job["codes"] == [0, 0], job["results"]
    got = received(job["results"], roles)
    assert as_counter(made + got) == as_counter(expected_records(cfg, roles))
    assert job["results"][0]["state"]["cursors"]["1"]["seq"] == 6  # 18 groups in 6 calls


def continue_config() -> Config:
    cfg = small_config(timeout_s=8.0)
    cfg.procedural.num_categories = 60  # a stream long enough to be mid-run at the fault
    cfg.roles.on_generator_loss = "continue"
    cfg.roles.max_idle_after_loss = 1.0
    return cfg


@pytest.mark.parametrize("kind, code", [("kill", -signal.SIGKILL), ("raise", 1)])
def test_with_continue_a_lost_generator_is_dropped_and_the_others_stream_arrives_whole(
        tmp_path, kind, code):
    cfg = continue_config()
    roles = Roles.from_spec("2", 3)
    job = run_job(tmp_path, "2", 3, cfg, {"fault": {"rank": 1, "kind": kind, "at_call": 3},
                                          "step_s": 0.01})
    assert job["codes"] == [0, code, 0], job["results"]
    trainer = job["results"][0]
    got = as_counter(received(job["results"], roles))
    want = as_counter(expected_records(cfg, roles))
    # The healthy generator's whole stream arrived once, intact; the lost one's first calls.
    assert {k: n for k, n in got.items() if k[2] == 2} == {k: n for k, n in want.items()
                                                           if k[2] == 2}
    assert all(k in want for k in got) and 0 < sum(n for k, n in got.items() if k[2] == 1)
    assert trainer["metrics"]["gen/generators_lost"] == 1
    assert trainer["metrics"]["gen/live/rank1"] == 0 and trainer["metrics"]["gen/live/rank2"] == 1


def test_with_continue_losing_every_generator_fails_the_trainer_naming_them(tmp_path):
    cfg = continue_config()
    cfg.roles.generators = "1"
    job = run_job(tmp_path, "1", 2, cfg, {"fault": {"rank": 1, "kind": "kill", "at_call": 3}})
    assert job["codes"] == [1, -signal.SIGKILL], job["results"]
    assert "no generator left" in job["results"][0]["error"], job["results"][0]
