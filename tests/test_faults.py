"""Faults an operator meets, injected into real jobs (real processes, gloo, the procedural
producer on tiny models), each checked for the exit, the message naming rank and role, the
checkpoint state and a successful resume (issue 9, faults 1 to 6).

- test_launcher_faults: a rank killed under launch/train.sh is named with its role by the
  wrapper (2); SIGTERM to the wrapper stops every rank at the next step with a checkpoint (1);
  a generator slower to build than transport.timeout_s resumes the job within
  transport.startup_timeout_s (6).
- test_disk_faults: a full disk names the path and leaves no partial folder (5); a truncated
  newest checkpoint falls back to the previous one with a warning (4) while a leftover .tmp
  folder holding meta.json breaks nothing (3).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from online_stablerep.training.checkpoint import newest_checkpoint, verify_checkpoint
from tests.helpers import TINY_PROCEDURAL, free_port, read_logs, read_summary, start_ranks, wait_all

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def hybrid_args(out: Path, *extra: str) -> list[str]:
    return [f"output_dir={out}", *TINY_PROCEDURAL, "roles.generators=1",
            "replay.capacity=48", "replay.max_reuse=2",
            "producer.captions_per_call=4", "transport.credits_per_generator=4",
            "train.checkpoint_every=2", "transport.timeout_s=10", *extra]


def wait_until(predicate, timeout: float, what: str, log: Path, job: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        ok = time.monotonic() < deadline and job.poll() is None
        assert ok, f"{what}; log:\n{log.read_text()[-3000:]}"
        time.sleep(0.3)


def launch(out: Path, log: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "MASTER_PORT": str(free_port()), "NUM_GPUS": "0",
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "STOP_GRACE_S": "60"}
    return subprocess.Popen(
        ["bash", str(ROOT / "launch/train.sh"), "--config", "cpu_procedural",
         *hybrid_args(out, *extra)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT,
    )


def last_words(out: Path) -> dict[int, dict]:
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in (out / "ranks").glob("rank*.json")}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


def steps_logged(log: Path) -> int:
    lines = [ln for ln in log.read_text().splitlines() if "train rank 0] step " in ln]
    return int(lines[-1].split("] step ")[1].split("/")[0]) if lines else 0


def test_launcher_faults(tmp_path):
    out = tmp_path / "run"
    # 1. Fault 2: a generator killed outright (SIGKILL: the OOM killer) is named with its role.
    log1 = tmp_path / "killed.log"
    job = launch(out, log1, "train.steps=100000")
    wait_until(lambda: newest_checkpoint(out) is not None, 150, "no first checkpoint", log1, job)
    generator_pid = last_words(out)[1]["pid"]
    os.kill(generator_pid, signal.SIGKILL)
    code = job.wait(timeout=90)
    text = log1.read_text()
    assert code != 0, text[-3000:]
    assert "job failed: rank 1 (generator) died without a last word" in text, text[-3000:]
    assert verify_checkpoint(newest_checkpoint(out)) is None
    killed_at = json.loads((newest_checkpoint(out) / "meta.json").read_text())["step"]

    # 2. Fault 1: SIGTERM to the wrapper (a pod stop) stops every rank at its next step; the
    # trainer saves a checkpoint of that step first.
    log2 = tmp_path / "sigterm.log"
    job = launch(out, log2, "train.steps=100000", "resume=true")
    wait_until(lambda: steps_logged(log2) >= killed_at + 1, 150, "no step after resume", log2, job)
    assert f"at step {killed_at}" in log2.read_text()  # "resumed from ... at step N"
    pids = [w["pid"] for w in last_words(out).values()]
    job.send_signal(signal.SIGTERM)
    code = job.wait(timeout=90)
    text = log2.read_text()
    assert code == 143, text[-3000:]
    assert "job stopped: SIGTERM" in text, text[-3000:]
    assert not any(alive(pid) for pid in pids)  # no orphans train on
    words = last_words(out)
    assert {w["status"] for w in words.values()} == {"stopped"}, words
    stopped_at = read_summary(out)["steps"]
    assert stopped_at > killed_at
    newest = newest_checkpoint(out)
    assert newest.name == f"step_{stopped_at:08d}" and verify_checkpoint(newest) is None

    # 3. Fault 6: the generator takes 2.5 x transport.timeout_s to build its model; its
    # keepalives say "warming up" and the resumed job finishes. 14 steps: more than the
    # restored buffer can serve (capacity 48 x max_reuse 2 / 8 groups a step = 12), so the
    # trainer must wait for the slow generator.
    logs3 = tmp_path / "slow"
    procs = start_ranks(2, ["--config", "cpu_procedural", *hybrid_args(
        out, f"train.steps={stopped_at + 14}", "resume=true", "transport.timeout_s=4",
        "transport.startup_timeout_s=60")], logs3, module="tests.fault_entry",
        extra_env={"FAULT_SLOW_BUILD_S": "10"})
    assert wait_all(procs, timeout=150) == [0, 0], read_logs(logs3)[-3000:]
    assert read_summary(out)["steps"] == stopped_at + 14
    trainer_log = (logs3 / "rank0.log").read_text()
    assert f"at step {stopped_at}" in trainer_log
    # The trainer needed the slow generator's groups: it finished after the generator resumed.
    resumed = re.search(r"\[(\S+) generator rank 1\] resuming",
                        (logs3 / "rank1.log").read_text()).group(1)
    finished = re.search(r"\[(\S+) train rank 0\] finished", trainer_log).group(1)
    assert resumed <= finished, (resumed, finished)


def in_namespace(script: str, timeout: float) -> subprocess.CompletedProcess:
    """Run a shell script in a private mount namespace (tmpfs mounts vanish with it)."""
    return subprocess.run(["unshare", "-rm", "bash", "-c", script], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = in_namespace("mount -t tmpfs -o size=1m tmpfs /mnt 2>/dev/null || "
                         "mount -t tmpfs -o size=1m tmpfs /tmp", 20)
    return probe.returncode == 0


@pytest.mark.skipif(not can_mount(), reason="needs unshare and tmpfs mounts")
def test_disk_faults(tmp_path):
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    ckpts.mkdir(parents=True)
    train = (f"{sys.executable} -m online_stablerep.cli train --config cpu_procedural "
             f"output_dir={out} {' '.join(TINY_PROCEDURAL)}")
    # 1. Fault 5: the disk fills up after the first checkpoint (the tmpfs is shrunk to what it
    # holds); the next save fails naming its folder and removes it. 2. Space is freed, and
    # 3. faults 4 and 3: the newest checkpoint is truncated and a killed save left a .tmp
    # folder holding meta.json; the resumed run falls back, trains on, saves and prunes.
    script = f"""
set -u
mount -t tmpfs -o size=2g tmpfs {ckpts}
{train} train.steps=40 train.checkpoint_every=1 train.keep_checkpoints=1 \
    > {tmp_path}/full.out 2> {tmp_path}/full.err &
job=$!
while [ ! -f {ckpts}/step_00000001/meta.json ]; do
  kill -0 $job 2>/dev/null || break; sleep 0.05
done
for try in $(seq 50); do
  used=$(df --output=used -k {ckpts} | tail -1 | tr -d ' ')
  mount -o remount,size=$((used + 64))k {ckpts} 2>/dev/null && break
done
wait $job; echo "full exit $?"
ls {ckpts} > {tmp_path}/after_full.txt
mount -o remount,size=2g {ckpts}
newest=$(ls -d {ckpts}/step_* | sort | tail -1)
step=$(basename $newest); step=$((10#${{step#step_}}))
cp -r $newest {ckpts}/step_$(printf %08d $((step + 1)))
truncate -s 1000 {ckpts}/step_$(printf %08d $((step + 1)))/model.pt
cp -r $newest $newest.tmp
echo "fallback $step"
{train} train.steps=$((step + 3)) train.checkpoint_every=1 train.keep_checkpoints=2 \
    resume=true > {tmp_path}/resume.out 2> {tmp_path}/resume.err
echo "resume exit $?"
ls {ckpts} > {tmp_path}/after_resume.txt
"""
    result = in_namespace(script, timeout=240)
    report = result.stdout + result.stderr
    full_err = (tmp_path / "full.err").read_text()
    assert "full exit 1" in report, report + full_err[-3000:]
    assert "[trainer rank 0] failed: CheckpointError: cannot write checkpoint" in full_err, (
        full_err[-3000:])
    assert "no space left on device" in full_err and ".tmp" in full_err, full_err[-3000:]
    assert "Traceback" not in full_err, full_err[-3000:]
    after_full = (tmp_path / "after_full.txt").read_text().split()
    assert after_full and not any(n.endswith(".tmp") for n in after_full), after_full
    step = int(report.split("fallback ")[1].split()[0])
    resume_err = (tmp_path / "resume.err").read_text()
    resume_out = (tmp_path / "resume.out").read_text()
    assert "resume exit 0" in report, resume_out[-2000:] + resume_err[-3000:]
    assert f"step_{step + 1:08d}: model.pt is 1000 bytes" in resume_out, resume_out[-3000:]
    assert f"at step {step}" in resume_out
    after = (tmp_path / "after_resume.txt").read_text().split()
    assert after == [f"step_{step + 2:08d}", f"step_{step + 3:08d}"], after
