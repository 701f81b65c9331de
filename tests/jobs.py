"""Start the real training job as one process per rank, as a launcher would (RANK, WORLD_SIZE,
MASTER_ADDR/PORT in the environment), so tests know every rank's PID."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ranks(world: int, args: list[str], log_dir: Path, module: str = "online_stablerep.cli",
                extra_env: dict | None = None) -> list[subprocess.Popen]:
    """`python -m MODULE train ARGS` on `world` ranks; logs in log_dir/rankN.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": "1", **(extra_env or {})}
        log = open(log_dir / f"rank{rank}.log", "w")  # noqa: SIM115 (closed with the process)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", module, "train", *args],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        ))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Exit codes of every rank; kills all and fails if any outlives `timeout`."""
    codes = []
    try:
        for proc in procs:
            codes.append(proc.wait(timeout=timeout))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        raise AssertionError(f"a rank did not exit within {timeout} s") from None
    return codes


def read_logs(log_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(log_dir.glob("rank*.log")))
