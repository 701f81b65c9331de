"""A model of the transport at scale (docs/performance.md, "Scale: 1,000 GPUs"), from measured
inputs.

    python benchmarks/scale_model.py --measure   # measure on this CPU, then model
    python benchmarks/scale_model.py             # model from benchmarks/results/scale-inputs-*.json

`--measure` times, in gloo worlds of 4..12 processes on this machine, init_process_group and the
job's create_groups (K/node layout over two "nodes") and counts each rank's open sockets; and
runs benchmarks/transport.py briefly at 256 px and at 8 px (the per-message cost without the
payload). The model then computes, for 125 nodes x 8 GPUs and the `plan` recommendation's best
split with dedicated generators for the `fast` and `dpm20` recipes: gloo connections per rank,
credits in flight, bytes per second per link and per node, the receiving trainer's CPU time per
group and per second, group creation time, and what breaks first. Writes
benchmarks/results/scale_model.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
IMAGE_BYTES = 3 * 256 * 256  # one stored image, uint8 (producer.output_size 256)
# Held fixed from the sd15_vitb16 preset and `online-stablerep plan --gpus 8 --nodes 125`
# (ESTIMATED rates: no recipe has been measured on a GPU yet).
LAYOUT = {"nodes": 125, "gpus_per_node": 8, "m": 10, "n": 43, "k": 6,
          "credits_per_generator": 8, "max_reuse": 9,
          # Keepalive intervals at transport.timeout_s 120: own node, other nodes (K/node).
          "keepalive_s": 5.0, "remote_keepalive_s": 40.0,
          # Groups a message carries: producer.captions_per_call of sd15_vitb16 (credit allowing).
          "groups_per_message": 4}
RECIPES = {  # gen images/s per GPU, trainer views/s per GPU, best split with dedicated gens
    "fast": {"gen": 71.32, "train": 2349.0, "gen_per_node": 7, "capacity": 688},
    "dpm20": {"gen": 8.563, "train": 2349.0, "gen_per_node": 7, "capacity": 774},
}


def _sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass  # the listing's own descriptor, closed by now
    return count


def _group_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from online_stablerep.distributed.groups import create_groups
    from online_stablerep.distributed.roles import Roles

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    before = _sockets()
    t0 = time.perf_counter()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    dist.barrier()
    t1 = time.perf_counter()
    roles = Roles.from_spec("1/node", world, world // 2)
    create_groups(roles, torch.device("cpu"), 60)
    dist.barrier()
    t2 = time.perf_counter()
    # Gloo connects lazily per pair on first use in some versions: touch every peer on every
    # world-wide group so the count is what a running job holds.
    dist.all_reduce(torch.zeros(1))
    record = {"rank": rank, "init_s": t1 - t0, "groups_s": t2 - t1,
              "sockets": _sockets() - before}
    Path(out, f"{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def measure_groups(worlds: list[int]) -> list[dict]:
    import torch.multiprocessing as mp

    from tests.helpers import free_port

    rows = []
    for world in worlds:
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(_group_worker, args=(world, free_port(), tmp), nprocs=world,
                               start_method="spawn")
            records = [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(world)]
        rows.append({"world": world,
                     "init_s": max(r["init_s"] for r in records),
                     "groups_s": max(r["groups_s"] for r in records),
                     "sockets_per_rank": sum(r["sockets"] for r in records) / world})
        print(f"world {world}: {rows[-1]}")
    return rows


def measure_messages() -> dict:
    """The receiving process's CPU ms per message (wire and link modes, k=10, 1 and 4 groups a
    message) at 256 px and at 8 px, where the payload is negligible."""
    from benchmarks import transport

    out = {}
    for size in (256, 8):
        with tempfile.TemporaryDirectory() as tmp:
            transport.main(["--k", "10", "--groups", "1,4", "--size", str(size), "--reps", "3",
                            "--rep-mb", "4" if size == 256 else "0.05", "--out", tmp])
            data = json.loads(next(Path(tmp).glob("transport-*.json")).read_text())
        for row in data["rows"]:
            out[f"{row['mode']}_{size}px_{row['groups']}groups"] = {
                "message_bytes": row["message_MB"] * 1e6,
                "cpu_s_per_message": row["receiver_cpu_ms_per_message"] / 1e3,
                "wall_s_per_message": row["groups"] / row["groups_per_s"]}
        out["machine"] = data["machine"]
    return out


def model(inputs: dict) -> dict:
    """The figures at 125 x 8 for each recipe, from the measured inputs."""
    lay = LAYOUT
    world = lay["nodes"] * lay["gpus_per_node"]
    groups_rows = inputs["groups"]
    # Sockets grow by one per peer per world-wide gloo group; fit per-peer slope on the largest
    # two worlds measured.
    a, b = groups_rows[-2], groups_rows[-1]
    sockets_per_peer = (b["sockets_per_rank"] - a["sockets_per_rank"]) / (b["world"] - a["world"])
    create_per_rank = (b["groups_s"] - a["groups_s"]) / (b["world"] - a["world"])
    msg = inputs["messages"]
    # Receiver CPU per message = fixed (8 px: no payload to speak of) + bytes x per-byte (the
    # 256 px message's extra CPU over the 8 px one), on the job's path (link: receiver threads
    # and credits) at 4 groups a message.
    fixed = msg["link_8px_1groups"]["cpu_s_per_message"]
    big, small = msg["link_256px_4groups"], msg["link_8px_4groups"]
    per_byte = max(0.0, big["cpu_s_per_message"] - small["cpu_s_per_message"]) / (
        big["message_bytes"] - small["message_bytes"])
    # A keepalive is one small message: the bare wire's cost without payload.
    small_message = msg["wire_8px_1groups"]["cpu_s_per_message"]
    out = {"world": world, "sockets_per_peer": sockets_per_peer,
           "sockets_per_rank": sockets_per_peer * (world - 1),
           "sockets_per_node": sockets_per_peer * (world - 1) * lay["gpus_per_node"],
           "group_creation_s_per_rank_of_world": create_per_rank,
           "group_creation_s_at_world": create_per_rank * world,
           "fixed_s_per_message": fixed, "s_per_byte": per_byte,
           "small_message_s": small_message, "recipes": {}}
    for name, r in RECIPES.items():
        k_gen = r["gen_per_node"]
        trainers = lay["nodes"] * (lay["gpus_per_node"] - k_gen)
        gens = lay["nodes"] * k_gen
        group_bytes = lay["m"] * IMAGE_BYTES
        link_Bps = r["gen"] * IMAGE_BYTES  # one generator -> its node's trainer
        t_per_node = lay["gpus_per_node"] - k_gen
        trainer_groups_per_s = k_gen * r["gen"] / lay["m"] / t_per_node
        trainer_Bps = trainer_groups_per_s * group_bytes
        # Keepalives: every generator pings every trainer it has not sent to lately: its own
        # node's every 5 s, the others' every 40 s.
        keepalive_in_per_s = k_gen / lay["keepalive_s"] + (gens - k_gen) / lay[
            "remote_keepalive_s"]
        keepalive_in_before = gens / lay["keepalive_s"]
        cpu_per_group = fixed / lay["groups_per_message"] + per_byte * group_bytes
        payload_busy = trainer_groups_per_s * cpu_per_group
        keepalive_busy = keepalive_in_per_s * small_message
        busy = payload_busy + keepalive_busy
        # A trainer trains at its rate, or as fast as reuse lets its inflow serve it.
        views_per_s = min(r["train"], trainer_groups_per_s * lay["k"] * lay["max_reuse"])
        step_s = lay["n"] * lay["k"] / views_per_s
        out["recipes"][name] = {
            "roles": f"{k_gen}/node", "trainers": trainers, "generators": gens,
            "group_MB": group_bytes / 1e6,
            "link_MB_per_s": link_Bps / 1e6,
            "trainer_in_MB_per_s": trainer_Bps / 1e6,
            "node_intra_MB_per_s": trainer_Bps * t_per_node / 1e6,
            "node_inter_MB_per_s_steady": 0.0,
            "node_inter_MB_per_s_total_count_layout": trainer_Bps * lay["gpus_per_node"] / 1e6,
            "trainer_groups_per_s": trainer_groups_per_s,
            "credits_in_flight_per_trainer": (
                k_gen * lay["credits_per_generator"] + lay["credits_per_generator"]),
            "credits_in_flight_MB_per_trainer": (
                (k_gen + 1) * lay["credits_per_generator"] * group_bytes / 1e6),
            "receiver_cpu_ms_per_group": cpu_per_group * 1e3,
            "keepalives_in_per_s": keepalive_in_per_s,
            "keepalives_in_per_s_all_at_5s": keepalive_in_before,
            "keepalive_cpu_fraction_all_at_5s": keepalive_in_before * small_message,
            "receiver_cpu_fraction_of_a_core": busy,
            "payload_cpu_fraction_of_a_core": payload_busy,
            "keepalive_cpu_fraction_of_a_core": keepalive_busy,
            "trainer_step_s": step_s,
            "receiver_cpu_ms_per_step": busy * step_s * 1e3,
        }
    return out


def markdown(result: dict) -> str:
    lines = [f"world {result['world']} ranks; sockets per rank {result['sockets_per_rank']:.0f} "
             f"({result['sockets_per_peer']:.2f} per peer), per node "
             f"{result['sockets_per_node']:.0f}; group creation about "
             f"{result['group_creation_s_at_world']:.0f} s (linear extrapolation); receiver "
             f"{result['fixed_s_per_message'] * 1e3:.2f} ms per message + "
             f"{result['s_per_byte'] * 1e9:.2f} ms per MB", "",
             "| recipe | roles | trainers | generators | MB/s per link | MB/s into a trainer "
             "| MB/s inter-node (K/node; total count) | credits in flight per trainer (MB) "
             "| receiver ms per group | keepalives in /s | receiver share of a core (payload + "
             "keepalives) | receiver ms per step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["recipes"].items():
        lines.append(
            f"| {name} | {r['roles']} | {r['trainers']} | {r['generators']} "
            f"| {r['link_MB_per_s']:.1f} | {r['trainer_in_MB_per_s']:.0f} "
            f"| {r['node_inter_MB_per_s_steady']:.0f}; {r['node_inter_MB_per_s_total_count_layout']:.0f} "
            f"| {r['credits_in_flight_per_trainer']} ({r['credits_in_flight_MB_per_trainer']:.0f}) "
            f"| {r['receiver_cpu_ms_per_group']:.2f} | {r['keepalives_in_per_s']:.0f} "
            f"| {r['receiver_cpu_fraction_of_a_core']:.1%} ({r['payload_cpu_fraction_of_a_core']:.1%}"
            f" + {r['keepalive_cpu_fraction_of_a_core']:.1%}) "
            f"| {r['receiver_cpu_ms_per_step']:.1f} of {r['trainer_step_s'] * 1e3:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="measure the inputs first")
    parser.add_argument("--worlds", default="4,8,12",
                        help="gloo worlds to time (even: two \"nodes\" of 1/node)")
    args = parser.parse_args(argv)
    path = RESULTS / "scale-inputs-cpu-2core.json"
    if args.measure:
        inputs = {"groups": measure_groups([int(w) for w in args.worlds.split(",")]),
                  "messages": measure_messages(), "date": time.strftime("%Y-%m-%d")}
        path.write_text(json.dumps(inputs, indent=2))
    inputs = json.loads(path.read_text())
    result = {"inputs": inputs, "layout": LAYOUT, "recipes_in": RECIPES, **model(inputs)}
    (RESULTS / "scale_model.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (RESULTS / "scale_model.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
