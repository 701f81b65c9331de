"""Restart without a person (issue 24): launch/train.sh restarts a failed job up to RESTARTS times
from its newest checkpoint, never after a clean stop, a signal to the wrapper or bad input; and
nothing of a stopped job outlives the wrapper (its stop-grace deadline is kept in its own loop).
"""

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from online_stablerep.jobs.restarts import (
    backoff_s,
    read_restarts,
    record_restart,
    restart_refusal,
)
from online_stablerep.jobs.shutdown import main as report
from online_stablerep.jobs.shutdown import write_last_word
from online_stablerep.training.checkpoint import newest_checkpoint
from tests.helpers import free_port, read_summary
from tests.test_faults import hybrid_args, last_words, steps_logged, wait_until

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("line, code, signalled, attempt, restarts, restart", [
    ("job failed: rank 0 (trainer) died without a last word", 1, False, 0, 1, True),
    ("job failed: rank 1 (generator) failed: RuntimeError: boom", 1, False, 1, 2, True),
    ("job failed: rank 1 (generator) failed: RuntimeError: boom", 1, False, 2, 2, False),
    ("job failed: rank 0 (trainer) failed: start-up failed on rank 0", 2, False, 0, 3, False),
    ("job failed: rank 0 (trainer) died without a last word", 137, True, 0, 3, False),
    ("job stopped: SIGTERM received by rank 0 (trainer)", 143, False, 0, 3, False),
    ("job finished: every rank exited cleanly", 0, False, 0, 3, False),
    ("job failed: rank 0 (trainer) died without a last word", 1, False, 0, 0, False),
])
def test_only_a_failure_not_from_input_or_an_operator_is_restarted(line, code, signalled, attempt,
                                                                    restarts, restart):
    assert (restart_refusal(line, code, signalled, attempt, restarts) is None) == restart


def test_back_off_doubles_up_to_a_cap():
    assert [backoff_s(a, 10) for a in (1, 2, 3, 6)] == [10, 20, 40, 300]


def test_the_report_records_each_restart_and_asks_for_it(tmp_path, capsys):
    write_last_word(tmp_path, 0, "trainer", "running")
    write_last_word(tmp_path, 1, "generator", "failed", "generator rank 1: closed", "peer", 1)
    assert report([str(tmp_path), "--world", "2", "--code", "1", "--restarts", "2",
                   "--backoff-s", "5"]) == 75
    err = capsys.readouterr().err
    assert "job failed: rank 0 (trainer) died" in err and "restart 1 of 2" in err, err
    # The second failure is the last allowed restart; the third is refused and said so.
    assert report([str(tmp_path), "--world", "2", "--code", "1", "--restarts", "2",
                   "--attempt", "1", "--backoff-s", "5"]) == 75
    assert report([str(tmp_path), "--world", "2", "--code", "1", "--restarts", "2",
                   "--attempt", "2", "--backoff-s", "5"]) == 1
    assert "not restarting: no restart left (RESTARTS=2)" in capsys.readouterr().err
    records = read_restarts(tmp_path)
    assert [(r["attempt"], r["of"], r["backoff_s"]) for r in records] == [(1, 2, 5), (2, 2, 10)]
    assert records[0]["reason"].startswith("job failed: rank 0 (trainer)")
    record_restart(tmp_path, 3, 3, "x", 1, 1.0)
    assert len(read_restarts(tmp_path)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranks", "restarts.jsonl"]


def launch(out: Path, log: Path, marker: str, *extra: str, config: str = "",
           **env: str) -> subprocess.Popen:
    """launch/train.sh on the tiny hybrid procedural job (or on preset `config` as it is, with
    `extra`), its environment marked with `marker`."""
    full_env = {**os.environ, "MASTER_PORT": str(free_port()), "NUM_GPUS": "0",
                "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "STOP_GRACE_S": "60",
                "RESTART_BACKOFF_S": "1", "JOB_MARKER": marker, **env}
    args = (["--config", config, f"output_dir={out}", *extra] if config else
            ["--config", "cpu_procedural", *hybrid_args(out, *extra)])
    return subprocess.Popen(["bash", str(ROOT / "launch/train.sh"), *args], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)


def processes_with(marker: str) -> list[str]:
    """Command lines of live processes whose environment holds `marker` (what a job started)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if f"JOB_MARKER={marker}".encode() in (proc / "environ").read_bytes():
                state = (proc / "stat").read_text().split(")")[-1].split()[0]
                if state != "Z":
                    found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_a_killed_trainer_is_restarted_and_the_run_finishes_its_steps(tmp_path):
    out, log, marker = tmp_path / "run", tmp_path / "job.log", uuid.uuid4().hex
    job = launch(out, log, marker, "train.steps=14", RESTARTS="1")
    wait_until(lambda: newest_checkpoint(out) is not None, 200, "no first checkpoint", log, job)
    os.kill(last_words(out)[0]["pid"], signal.SIGKILL)
    code = job.wait(timeout=300)
    text = log.read_text()
    assert code == 0, text[-4000:]
    assert "restarting the job from its newest checkpoint in 1 s (restart 1 of 1" in text
    assert "resumed from" in text and "job finished" in text, text[-4000:]
    assert read_summary(out)["steps"] == 14
    records = read_restarts(out)
    assert len(records) == 1, records
    assert records[0]["reason"].startswith("job failed: rank 0 (trainer) died without a last "
                                           "word"), records
    assert processes_with(marker) == []


@pytest.mark.slow
def test_sigterm_to_the_wrapper_stops_without_restart_and_leaves_no_process(tmp_path):
    out, log, marker = tmp_path / "run", tmp_path / "job.log", uuid.uuid4().hex
    job = launch(out, log, marker, "train.steps=100000", RESTARTS="3")
    wait_until(lambda: steps_logged(log) >= 1, 200, "no first step", log, job)
    job.send_signal(signal.SIGTERM)
    code = job.wait(timeout=120)
    text = log.read_text()
    assert code == 143, text[-3000:]
    assert "job stopped: SIGTERM" in text and "restarting" not in text, text[-3000:]
    assert not (out / "restarts.jsonl").exists()
    assert {w["status"] for w in last_words(out).values()} == {"stopped"}
    # Nothing the job started lives on: no rank, no launcher, no stop-grace killer (it used to
    # sleep STOP_GRACE_S, then SIGKILL a process group id that may be someone else's by then).
    assert processes_with(marker) == []
    assert json.loads((out / "train_summary.json").read_text())["stopped_because"] == (
        "stopped by a signal")
