"""How a rank ends: a stop request set by SIGTERM/SIGINT that the loops honour at their next step,
and a last word per rank (`output_dir/ranks/rank{N}.json`: role, status, reason) that the job's
wrapper reads once the launcher exits, to print one line naming the rank that failed and its role.

`python -m online_stablerep.jobs.shutdown OUTPUT_DIR --world N --code C` is that report
(launch/train.sh runs it); it exits with the job's exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from online_stablerep import atomic
from online_stablerep.jobs.restarts import (
    RESTART_CODE,
    RESTARTS_FILE,
    backoff_s,
    record_restart,
    restart_refusal,
)

RANKS_DIR = "ranks"


class StopRequest(threading.Event):
    """Set by the first SIGTERM or SIGINT: trainers stop at the next step with a checkpoint,
    generators send END. A second SIGINT (Ctrl-C twice) stops at once; repeated SIGTERMs (the
    launcher forwards the one the whole process group got) change nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.signal_name = ""

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by the signal (143 for SIGTERM)."""
        return 128 + int(signal.Signals[self.signal_name]) if self.signal_name else 0

    def install(self, on_request: Any = None) -> None:
        """Handle SIGTERM and SIGINT in this (main) thread from now on."""

        def handle(signum: int, frame: object) -> None:
            name = signal.Signals(signum).name
            if self.is_set():
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt(f"second {name}: stopping at once")
                return
            self.signal_name = name
            self.set()
            if on_request is not None:
                on_request(name)

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)


def last_word_path(output_dir: str | Path, rank: int) -> Path:
    return Path(output_dir) / RANKS_DIR / f"rank{rank}.json"


def write_last_word(output_dir: str | Path, rank: int, role: str, status: str, reason: str = "",
                    cause: str = "", code: int = 0) -> None:
    """Record this rank's state: status is running, finished, stopped (by a signal, cleanly),
    failed, or lost (a generator gone while the job went on: roles.on_generator_loss=continue);
    cause is "own" (this rank's error) or "peer" (another rank failed or vanished).
    Never raises: a rank that cannot write (a bad output_dir) still exits with its code."""
    word = {"rank": rank, "role": role, "status": status, "reason": reason, "cause": cause,
            "code": code, "pid": os.getpid(), "time": time.time()}
    _store(output_dir, word)


def _store(output_dir: str | Path, word: dict[str, Any]) -> bool:
    """Replace the word file of word["rank"] atomically; False when it cannot be written."""
    path = last_word_path(output_dir, word["rank"])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps(word))
    except OSError:
        return False
    return True


def mark_vanished(output_dir: str | Path, words: dict[int, dict[str, Any] | None],
                  local: range) -> None:
    """Give this node's ranks that vanished (a "running" word, their processes gone: the
    wrapper runs this once its launcher's whole process group has exited) the final status
    "died", so other nodes sharing output_dir need not wait `--wait-s` for a word that will
    never come. The word keeps the rank's role and pid; "died" reads as vanished."""
    for rank in local:
        word = words.get(rank)
        if word is None or word["status"] != "running":
            continue
        died = {**word, "status": "died", "reason": "the process vanished without a final word",
                "time": time.time()}
        if _store(output_dir, died):
            words[rank] = died


def read_last_words(output_dir: str | Path, world: int) -> dict[int, dict[str, Any] | None]:
    """Rank -> its last word, None for a rank that wrote none."""
    words: dict[int, dict[str, Any] | None] = {}
    for rank in range(world):
        try:
            words[rank] = json.loads(last_word_path(output_dir, rank).read_text())
        except (OSError, ValueError):
            words[rank] = None
    return words


def summarize(
    words: dict[int, dict[str, Any] | None], launcher_code: int,
    local: range | None = None,
) -> tuple[str, int]:
    """One line saying how the job ended, naming the failed rank and its role; and the job's
    exit code. The rank to blame: one that failed of its own error, else one that vanished
    without a final word (killed: SIGKILL, the out-of-memory killer), else one failed by a peer.

    `local` holds the ranks of this node (default: all), whose launcher has exited: a local
    rank with no final word vanished. Another node's rank may still be running, or its word
    may sit on that node's disk: it counts as vanished only with a "running" word, and a
    missing one is not blamed (`wait_for_final_words` gives those nodes time first).
    """
    local = range(len(words)) if local is None else local
    # "died": a word "running" that its node's wrapper closed after the process vanished.
    final = {r: w for r, w in words.items()
             if w is not None and w["status"] not in ("running", "died")}
    vanished = [r for r in words if r not in final and (r in local or words[r] is not None)]
    own = [r for r, w in final.items() if w["status"] == "failed" and w["cause"] != "peer"]
    failed = [r for r, w in final.items() if w["status"] == "failed"]
    if own:
        w = final[own[0]]
        return f"job failed: rank {own[0]} ({w['role']}) failed: {w['reason']}", w["code"] or 1
    if vanished:
        r = min(vanished, key=lambda v: (v not in local, v))  # this node's first
        role = f" ({words[r]['role']})" if words[r] else ""
        where = "" if r in local else " on another node"
        return (f"job failed: rank {r}{role}{where} died without a last word (killed by "
                "SIGKILL, the out-of-memory killer, or a crash of the interpreter)"), (
                    launcher_code or 1)
    if failed:
        w = final[failed[0]]
        return f"job failed: rank {failed[0]} ({w['role']}) failed: {w['reason']}", w["code"] or 1
    lost = [r for r, w in final.items() if w["status"] == "lost"]
    went_on = "".join(f"; generator rank {r} was lost on the way ({final[r]['reason']}) and the "
                      "job went on (roles.on_generator_loss=continue)" for r in lost)
    stopped = [w for w in final.values() if w["status"] == "stopped"]
    if stopped:
        return (f"job stopped: {stopped[0]['reason']}; every rank stopped cleanly "
                f"(resume=true continues from the last checkpoint){went_on}"), stopped[0]["code"]
    return f"job finished: every rank exited cleanly{went_on}", launcher_code


def wait_for_final_words(
    output_dir: str | Path, world: int, local: range, wait_s: float
) -> dict[int, dict[str, Any] | None]:
    """The last words, once every other node's rank that wrote "running" (into a shared
    output_dir) has written its final word, or after `wait_s`: this node's ranks have exited,
    so the other nodes' ranks are failing too (in seconds, at most `transport.timeout_s`) and
    a killed one stays "running". A rank slower than `wait_s` to write may be blamed wrongly
    on this node's line; its own node's line is right."""
    deadline = time.monotonic() + wait_s
    while True:
        words = read_last_words(output_dir, world)
        own = any(w and w["status"] == "failed" and w["cause"] != "peer" for w in words.values())
        pending = [r for r, w in words.items()
                   if r not in local and w is not None and w["status"] == "running"]
        if own or not pending or time.monotonic() > deadline:
            return words
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="online_stablerep.jobs.shutdown",
                                     description="Say how a job ended, from its ranks' last words.")
    parser.add_argument("output_dir")
    parser.add_argument("--world", type=int, required=True, help="ranks the job started")
    parser.add_argument("--code", type=int, default=0, help="the launcher's exit code")
    parser.add_argument("--node-rank", type=int, default=0, help="this node's index")
    parser.add_argument("--ranks-per-node", type=int, default=0,
                        help="ranks this node's launcher started (0: the whole world)")
    parser.add_argument("--wait-s", type=float, default=10.0,
                        help="how long to wait for other nodes' ranks to write a final word")
    parser.add_argument("--restarts", type=int, default=0,
                        help="restarts allowed (RESTARTS): a failed job that may be restarted "
                        f"is recorded in restarts.jsonl and the exit code is {RESTART_CODE}")
    parser.add_argument("--attempt", type=int, default=0, help="restarts already made")
    parser.add_argument("--backoff-s", type=float, default=10.0,
                        help="base of the doubling back-off before a restart")
    parser.add_argument("--signalled", action="store_true",
                        help="the wrapper got SIGTERM or SIGINT: never restart")
    args = parser.parse_args(argv)
    per_node = args.ranks_per_node or args.world
    local = range(args.node_rank * per_node, (args.node_rank + 1) * per_node)
    mark_vanished(args.output_dir, read_last_words(args.output_dir, args.world), local)
    words = wait_for_final_words(args.output_dir, args.world, local, args.wait_s)
    line, code = summarize(words, args.code, local)
    print(line, file=sys.stderr if code else sys.stdout, flush=True)
    refusal = restart_refusal(line, code, args.signalled, args.attempt, args.restarts)
    if refusal is None:
        attempt = args.attempt + 1
        wait_s = backoff_s(attempt, args.backoff_s)
        record_restart(args.output_dir, attempt, args.restarts, line, code, wait_s)
        print(f"restarting the job from its newest checkpoint in {wait_s:g} s (restart "
              f"{attempt} of {args.restarts}; recorded in {RESTARTS_FILE})", file=sys.stderr,
              flush=True)
        return RESTART_CODE
    if args.restarts and refusal and line.startswith("job failed"):
        print(f"not restarting: {refusal}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
