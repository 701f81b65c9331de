"""A generator rank that may fail alone (`roles.on_generator_loss=continue`) under a launcher that
ends the whole job as soon as any rank exits non-zero (the deepspeed launcher does).

The rank's process becomes a small supervisor: it runs the real generator rank as its child
(same command line, `ONLINE_STABLEREP_GENERATOR_WORKER=1`) and waits. When the child dies (a
SIGKILL, the out-of-memory killer), fails of its own error, or is stopped alone by a signal, the
supervisor records the rank as "lost" in its last word and exits 0, so the launcher leaves the
other ranks running; the trainers drop that generator and go on (transport/receiver.py). A child
that finishes, that stops because the supervisor itself was signalled (the whole job stops), or
that fails because a peer did, passes its exit code through.

The pid in `output_dir/ranks/rankN.json` is the child's (it writes its own last words).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from online_stablerep.jobs.shutdown import read_last_words, write_last_word
from online_stablerep.monitoring.metrics import console

WORKER_ENV = "ONLINE_STABLEREP_GENERATOR_WORKER"


def is_worker() -> bool:
    """Whether this process is the supervised generator itself."""
    return os.environ.get(WORKER_ENV) == "1"


def _how_it_ended(code: int) -> str:
    if code < 0:
        return f"the process was killed by {signal.Signals(-code).name}"
    return f"the process exited with code {code} without a final word"


def supervise(output_dir: str | Path, rank: int) -> int:
    """Run this generator rank as a child process; returns this process's exit code."""
    child = subprocess.Popen(sys.orig_argv, env={**os.environ, WORKER_ENV: "1"})
    signalled = []

    def forward(signum: int, frame: object) -> None:
        # The job is stopping (the wrapper or launcher signalled this rank): the child stops
        # at its next step, as any rank does. SIGTERM only: a second SIGINT would stop it at
        # once, and a terminal's Ctrl-C reaches it directly.
        signalled.append(signum)
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = child.wait()
    if code == 0 or signalled:
        return code if code >= 0 else 128 - code
    word = read_last_words(output_dir, rank + 1)[rank]
    if word is not None and word["status"] == "failed" and word["cause"] == "peer":
        return code  # the job is failing anyway: the trainers' reason stands
    if word is not None and word["status"] in ("failed", "stopped"):
        reason = word["reason"]
    else:
        reason = _how_it_ended(code)
    write_last_word(output_dir, rank, "generator", "lost", reason, "own", code)
    console(f"generator lost ({reason}); the job goes on without it "
            "(roles.on_generator_loss=continue)", role="generator", rank=rank)
    return 0
