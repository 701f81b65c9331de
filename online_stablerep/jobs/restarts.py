"""Restart without a person: which job ends the wrapper (launch/train.sh) restarts by itself, and
the record of each restart in `output_dir/restarts.jsonl`.

With `RESTARTS=N` in its environment (like torchrun's `--max-restarts`; 0 by default) the
wrapper restarts a failed job up to N times, from the newest valid checkpoint (`resume=true`),
after a back-off that doubles each time (`RESTART_BACKOFF_S`, default 10 s, at most 300 s).
Never after a clean finish, a clean stop (a signal to the wrapper or to the ranks), or a
start-up failure from bad input (exit code 2): those would fail the same way again, or were
wanted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from online_stablerep import atomic

RESTARTS_FILE = "restarts.jsonl"
# The wrapper's own exit code for "restart me": jobs.shutdown returns it to launch/train.sh only
# when asked with --restarts, and the wrapper never exits with it.
RESTART_CODE = 75
# Longest back-off between restarts, seconds.
MAX_BACKOFF_S = 300.0


def backoff_s(attempt: int, base_s: float) -> float:
    """Seconds to wait before restart `attempt` (1-based): base, 2 x base, 4 x base, ..."""
    return min(MAX_BACKOFF_S, base_s * 2 ** (attempt - 1))


def restart_refusal(line: str, code: int, signalled: bool, attempt: int,
                    restarts: int) -> str | None:
    """None when the job that ended with summary `line` and exit `code` is to be restarted,
    else why not.

    Args:
        line: jobs.shutdown.summarize's line ("job finished", "job stopped: ...",
            "job failed: ...").
        signalled: the wrapper itself got SIGTERM or SIGINT (the operator, the scheduler).
        attempt: restarts already made.
        restarts: most restarts allowed (RESTARTS).
    """
    if not line.startswith("job failed"):
        return "the job did not fail"
    if signalled:
        return "the wrapper was asked to stop"
    if code == 2:
        return "a start-up failure from bad input (exit code 2) fails the same way again"
    if attempt >= restarts:
        return f"no restart left (RESTARTS={restarts})" if restarts else ""
    return None


def record_restart(output_dir: str | Path, attempt: int, restarts: int, line: str, code: int,
                   wait_s: float) -> dict:
    """Append one restart to `output_dir/restarts.jsonl` (whole lines: the file is rewritten
    atomically, it stays a few lines long) and return the record."""
    path = Path(output_dir) / RESTARTS_FILE
    record = {"attempt": attempt, "of": restarts, "time": time.time(), "code": code,
              "reason": line, "backoff_s": wait_s}
    old = path.read_text() if path.exists() else ""
    atomic.write_text(path, old + json.dumps(record) + "\n")
    return record


def read_restarts(output_dir: str | Path) -> list[dict]:
    """The restarts of a run, oldest first."""
    path = Path(output_dir) / RESTARTS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    """Record one restart decided outside jobs.shutdown (launch/slurm.sbatch restarts a whole
    multi-node step) and print it."""
    parser = argparse.ArgumentParser(prog="online_stablerep.jobs.restarts",
                                     description="Append a restart to output_dir/restarts.jsonl.")
    parser.add_argument("output_dir")
    parser.add_argument("--attempt", type=int, required=True, help="this restart's number")
    parser.add_argument("--of", type=int, required=True, help="restarts allowed")
    parser.add_argument("--code", type=int, required=True, help="the failed step's exit code")
    parser.add_argument("--reason", required=True)
    parser.add_argument("--backoff-s", type=float, required=True)
    args = parser.parse_args(argv)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    record_restart(args.output_dir, args.attempt, args.of, args.reason, args.code, args.backoff_s)
    print(f"restarting the job from its newest checkpoint in {args.backoff_s:g} s (restart "
          f"{args.attempt} of {args.of}; recorded in {RESTARTS_FILE}): {args.reason}",
          file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
