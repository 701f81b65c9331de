"""Profile the Trainer's step: a torch.profiler table of the ops that cost most over a few
steps of Trainer.fit on one fixed batch (warm-up steps excluded), written to
benchmarks/results/profile-trainer-<machine>-<label>.txt.

    python benchmarks/profile_trainer.py --label after                    # CPU, cpu_demo shape
    python benchmarks/profile_trainer.py --device cuda --label after      # sd15_vitb16 shape
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS_DIR, machine_name, resolve_device  # noqa: E402
from benchmarks.trainer import DEFAULTS, InterleavedSource, synthetic_batch  # noqa: E402


class _NoProgress:
    def update(self, _: int) -> None:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--label", default="current", help="suffix of the results file")
    parser.add_argument("--rows", type=int, default=20, help="table rows")
    args = parser.parse_args()
    device = resolve_device(args.device, args.threads)
    shape = DEFAULTS[args.device]
    backbone = args.backbone or shape["backbones"].split(",")[-1].partition("+")[0]

    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile, schedule

    from online_stablerep.config import load_config
    from online_stablerep.distributed.groups import create_groups, init_with_deepspeed
    from online_stablerep.distributed.process import single_process_env
    from online_stablerep.distributed.roles import Roles
    from online_stablerep.training.trainer import Trainer

    single_process_env()
    init_with_deepspeed(device, timeout_s=600)
    try:
        groups = create_groups(Roles(world_size=1, num_generators=0), device, 600)
        n, k, size = shape["captions"], shape["views"], shape["input_size"]
        with tempfile.TemporaryDirectory(prefix="profile-trainer-") as out_dir:
            cfg = load_config(shape["config"], [
                f"output_dir={out_dir}", f"model.backbone={backbone}",
                f"model.image_size={shape['image_size']}", f"batch.captions_per_batch={n}",
                f"batch.views_per_caption={k}", f"train.steps={args.warmup + args.steps + 1}",
                "train.checkpoint_every=0", "train.image_grid_every=0",
                f"train.log_every={args.warmup + args.steps + 1}", "optim.warmup_steps=1",
                "replay.checkpoint_contents=false"])
            activities = [ProfilerActivity.CPU] + (
                [ProfilerActivity.CUDA] if device.type == "cuda" else [])
            tables: list[str] = []
            sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"

            def keep(prof: profile) -> None:
                tables.append(prof.key_averages().table(sort_by=sort, row_limit=args.rows))

            with profile(activities=activities, on_trace_ready=keep, schedule=schedule(
                    wait=0, warmup=args.warmup, active=args.steps, repeat=1)) as prof:
                # The profiler advances once per batch handed out, i.e. once per step.
                source = InterleavedSource(synthetic_batch(n, k, size, cfg.seed), device,
                                           prof.step, _NoProgress())
                Trainer(cfg, groups, source, device).fit()
    finally:
        dist.destroy_process_group()
    table = tables[0]
    header = (f"Trainer.fit, {backbone} at {shape['image_size']} px, n={n} x k={k}, "
              f"{args.steps} profiled steps after {args.warmup} warm-up, {machine_name(device)}, "
              f"label {args.label}\n")
    path = RESULTS_DIR / f"profile-trainer-{machine_name(device)}-{args.label}.txt"
    path.write_text(header + table + "\n")
    print(header + table)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
