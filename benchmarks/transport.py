"""Caption-group transport between two processes over the gloo data-plane group.

    python benchmarks/transport.py            # CPU: k in {4, 10}, 1/4/16 groups a message
    python benchmarks/transport.py --device cuda   # same sizes (the data plane is CPU gloo)

Two spawned processes join a world of two (rank 0 a trainer, rank 1 a generator) and create
the job's process groups exactly as the training job does. Two modes per payload:
- `wire`: pack_groups -> send_data -> recv_data -> unpack_groups, back to back: the cost of
  the data plane itself;
- `link`: the real GeneratorLink and Receiver, credits included, with the trainer's main thread
  draining the replay buffer as fast as it fills: what the job's transport can carry.
Images are k x 3 x 256 x 256 uint8 (`--size`). A repetition is enough messages to move about
`--rep-mb` MB, timed on the receiving side after `--warmup` untimed repetitions; the receiving
process's CPU time (all its threads, gloo's included) is recorded too:
`receiver_cpu_ms_per_message`, what a trainer pays per message (benchmarks/scale_model.py).
Writes benchmarks/results/transport-<machine>.{json,csv,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.multiprocessing as mp
from tqdm import tqdm

from benchmarks.common import (
    Timing,
    add_common_arguments,
    machine_name,
    plot_lines,
    resolve_device,
    write_results,
)
from online_stablerep.records import CaptionGroup
from tests.helpers import free_port

TIMEOUT_S = 120.0
TRAINER, GENERATOR = 0, 1


def make_groups(count: int, k: int, size: int, seed: int) -> list[CaptionGroup]:
    """`count` caption groups of k random (3, size, size) uint8 images each."""
    gen = torch.Generator().manual_seed(seed)
    return [
        CaptionGroup(caption_id=i, caption=f"caption number {i} of the transport benchmark",
                     images_kchw=torch.randint(0, 256, (k, 3, size, size), dtype=torch.uint8,
                                               generator=gen),
                     guidance_scale=2.0, seed=seed, producer_rank=GENERATOR,
                     created_at=time.time())
        for i in range(count)
    ]


def plan_points(ks: list[int], per_message: list[int], size: int, rep_mb: float
                ) -> list[dict[str, int]]:
    """Every (mode, k, groups per message) point with its messages per repetition."""
    points = []
    for mode in ("wire", "link"):
        for k in ks:
            for groups in per_message:
                message_bytes = groups * k * 3 * size * size
                messages = max(1, round(rep_mb * 1e6 / message_bytes))
                points.append({"mode": mode, "k": k, "groups": groups, "messages": messages})
    return points


def _wire_point(groups_obj: Any, rank: int, point: dict, batch: list[CaptionGroup],
                reps: int) -> list[tuple[float, float]]:
    """Back-to-back packed messages; the trainer times each repetition (wall, CPU seconds)."""
    from online_stablerep.transport import messages as msg
    from online_stablerep.transport.wire import pack_groups, unpack_groups

    group = groups_obj.data_plane
    seconds = []
    for _ in range(reps):
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(point["messages"]):
            if rank == GENERATOR:
                header, payload = pack_groups(batch, b"{}")
                msg.send_data(group, TRAINER, header, payload, TIMEOUT_S)
            else:
                _, _, args = msg.recv_message(group, GENERATOR, TIMEOUT_S)
                unpack_groups(*msg.recv_data(group, GENERATOR, args, TIMEOUT_S))
        seconds.append((time.perf_counter() - start, time.process_time() - cpu))
    return seconds


def _link_point(groups_obj: Any, rank: int, point: dict, batch: list[CaptionGroup],
                reps: int) -> list[tuple[float, float]]:
    """The job's GeneratorLink -> Receiver path under credit; the trainer drains its buffer."""
    from online_stablerep.replay import ReplayBuffer
    from online_stablerep.transport.receiver import Receiver
    from online_stablerep.transport.sender import GeneratorLink

    per_rep = point["messages"] * point["groups"]
    total = per_rep * reps
    if rank == GENERATOR:
        link = GeneratorLink(groups_obj, TIMEOUT_S)
        link.wait_hello()
        sent, seq = 0, 0
        while sent < total:
            taken = link.take_credit(min(point["groups"], total - sent))
            assert taken is not None, "the trainer stopped before the benchmark ended"
            trainer, count = taken
            seq += 1
            cursor = {"seq": seq, "end": count, "len": count, "before": None, "after": None}
            link.send(trainer, batch[:count],
                      {"cursor": cursor, "images_per_s": 0.0, "idle_fraction": 0.0})
            sent += count
        link.finish()
        return []
    # Two messages in flight: one on the wire while the next is packed, as in the job.
    buffer = ReplayBuffer(capacity=4 * point["groups"], max_reuse=1)
    receiver = Receiver(groups_obj, buffer, 2 * point["groups"], TIMEOUT_S)
    receiver.start()
    seconds, drained = [], 0
    try:
        for _ in range(reps):
            start, cpu = time.perf_counter(), time.process_time()
            target = drained + per_rep
            while drained < target:
                if receiver.error is not None:
                    raise receiver.error
                if buffer.sample(1, 1) is None:
                    buffer.wait_ready(1, 0.05)
                    continue
                drained += 1
                receiver.notify_room()
            seconds.append((time.perf_counter() - start, time.process_time() - cpu))
    finally:
        receiver.stop()
    return seconds


def worker(rank: int, port: int, points: list[dict], size: int, warmup: int, reps: int,
           result_path: str) -> None:
    """One rank of the two-process world; the trainer writes every point's timings."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    import torch.distributed as dist

    from online_stablerep.distributed.groups import create_groups, init_distributed
    from online_stablerep.distributed.roles import Roles

    cpu = torch.device("cpu")
    init_distributed(cpu, TIMEOUT_S)
    try:
        groups_obj = create_groups(Roles(world_size=2, num_generators=1), cpu, TIMEOUT_S)
        results = []
        for point in tqdm(points, desc="transport benchmark", disable=rank != TRAINER):
            batch = make_groups(point["groups"], point["k"], size, seed=point["k"])
            run = _wire_point if point["mode"] == "wire" else _link_point
            seconds = run(groups_obj, rank, point, batch, warmup + reps)
            # Keep the two sides in step between points, so no point's traffic leaks into the next.
            dist.barrier(group=groups_obj.control)
            results.append(seconds[warmup:])
        if rank == TRAINER:
            Path(result_path).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, warmup=1, reps=5)
    parser.add_argument("--k", default="4,10", help="images per caption group, comma-separated")
    parser.add_argument("--groups", default="1,4,16",
                        help="caption groups per message, comma-separated")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--rep-mb", type=float, default=24.0,
                        help="payload moved per timed repetition (MB)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    ks = [int(v) for v in args.k.split(",")]
    per_message = [int(v) for v in args.groups.split(",")]
    points = plan_points(ks, per_message, args.size, args.rep_mb)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-transport-") as tmp:
        result_path = str(Path(tmp) / "timings.json")
        mp.start_processes(worker, args=(free_port(), points, args.size, args.warmup,
                                         args.reps, result_path),
                           nprocs=2, join=True, start_method="spawn")
        measured = json.loads(Path(result_path).read_text())
    timings = [Timing([wall for wall, _ in reps]) for reps in measured]
    cpu = [Timing([cpu for _, cpu in reps]) for reps in measured]
    rows = []
    for point, timing, cpu_timing in zip(points, timings, cpu, strict=True):
        groups = point["messages"] * point["groups"]
        megabytes = groups * point["k"] * 3 * args.size ** 2 / 1e6
        rows.append({**point, "message_MB": megabytes / point["messages"],
                     **timing.rates(megabytes, "MB_per_s"), **timing.rates(groups, "groups_per_s"),
                     **timing.rates(groups * point["k"], "images_per_s"), **timing.fields(),
                     "receiver_cpu_ms_per_message": cpu_timing.median / point["messages"] * 1e3})
    link_rows = [r for r in rows if r["mode"] == "link"]
    best = max(link_rows, key=lambda r: r["MB_per_s"])
    summary = {
        "link_MB_per_s_max": best["MB_per_s"],
        "link_groups_per_s_at_max": best["groups_per_s"],
        "link_best_point": {"k": best["k"], "groups_per_message": best["groups"]},
        "wire_MB_per_s_max": max(r["MB_per_s"] for r in rows if r["mode"] == "wire"),
        "load_avg_before": list(load_before), "load_avg_after": list(os.getloadavg()),
    }
    settings = {"ks": ks, "groups_per_message": per_message, "image_size": args.size,
                "rep_mb": args.rep_mb, "warmup": args.warmup, "reps": args.reps,
                "backend": "gloo", "processes": 2, "torch_threads_per_process": 1}
    paths = write_results("transport", device, settings, summary, rows, args.out)
    series = {f"{mode} k={k}": [r["MB_per_s"] for r in rows if r["mode"] == mode and r["k"] == k]
              for mode in ("wire", "link") for k in ks}
    spread = {f"{mode} k={k}": [(r["MB_per_s_p25"], r["MB_per_s_p75"]) for r in rows
                                if r["mode"] == mode and r["k"] == k]
              for mode in ("wire", "link") for k in ks}
    png = plot_lines(args.out / f"transport-{machine_name(device)}.png",
                     f"caption-group transport, gloo, {machine_name(device)}",
                     "caption groups per message", "MB/s", per_message, series, spread)
    for row in rows:
        print(f"{row['mode']:>4} k={row['k']:<2} groups/msg={row['groups']:<2} "
              f"{row['MB_per_s']:8.1f} MB/s  {row['groups_per_s']:8.1f} groups/s "
              f"(IQR {row['MB_per_s_p25']:.1f}-{row['MB_per_s_p75']:.1f} MB/s), receiver "
              f"{row['receiver_cpu_ms_per_message']:.2f} ms CPU per message")
    print(f"wrote {paths['json']}, {paths['csv']}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
