"""A generator may fail alone (issue 24), in real jobs under launch/train.sh: with
`roles.on_generator_loss=continue` a SIGKILLed or SIGTERMed generator is dropped and the job
finishes its steps with the other (the deepspeed launcher would end the job on a rank's non-zero
exit: jobs/supervise.py keeps the generator's process from exiting so); an injected out-of-memory
error in generation is retried in halves, a caption that still fails is skipped and counted, and
the job finishes."""

import os
import signal
import uuid

import pytest

from online_stablerep.jobs.shutdown import read_last_words
from tests.helpers import read_summary, tensorboard_tags
from tests.test_faults import last_words, steps_logged, wait_until
from tests.test_restarts import launch, processes_with

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_with_continue_a_lost_generator_leaves_the_job_to_finish_its_steps(tmp_path, sig):
    out, log, marker = tmp_path / "run", tmp_path / "job.log", uuid.uuid4().hex
    job = launch(out, log, marker, "roles.generators=2", "roles.on_generator_loss=continue",
                 "roles.max_idle_after_loss=1.0", "train.steps=24", "train.checkpoint_every=0")
    wait_until(lambda: steps_logged(log) >= 2, 300, "no second step", log, job)
    os.kill(last_words(out)[1]["pid"], sig)  # the generator itself (its supervisor stays)
    code = job.wait(timeout=400)
    text = log.read_text()
    assert code == 0, text[-4000:]
    assert read_summary(out)["steps"] == 24
    assert "job finished: every rank exited cleanly; generator rank 1 was lost on the way" in text
    word = read_last_words(out, 3)[1]
    assert word["status"] == "lost", word
    if sig == signal.SIGKILL:
        # The trainer saw the process go (connection closed or silence) and said so.
        assert "generator rank 1 lost (" in text and "going on with 1 of 2" in text, text[-4000:]
        assert word["reason"] == "the process was killed by SIGKILL"
    else:
        # A generator stopped alone ends its stream cleanly (END): the trainer goes on.
        assert word["reason"] == "SIGTERM received by rank 1 (generator)", word
    assert {"gen/live/rank1", "gen/generators_live", "gen/stragglers"} <= tensorboard_tags(
        out / "tensorboard" / "train")
    assert processes_with(marker) == []


def test_an_injected_out_of_memory_in_generation_is_retried_and_skipped_not_fatal(tmp_path):
    out, log, marker = tmp_path / "run", tmp_path / "job.log", uuid.uuid4().hex
    # cpu_demo: the diffusion producer (the shipped toy model), calls of 5 captions. Calls of
    # more than 2 captions run out of memory, and caption 3 always does.
    job = launch(out, log, marker, "train.steps=6", "train.log_every=1", "train.cpu_threads=1",
                 "eval.probe_at_end=false", "train.image_grid_every=0", config="cpu_demo",
                 ONLINE_STABLEREP_INJECT="oom_above=2,oom_caption=3")
    code = job.wait(timeout=600)
    text = log.read_text()
    assert code == 0, text[-4000:]
    assert read_summary(out)["steps"] == 6
    assert "out of memory on a call of 5 captions: retrying in halves" in text, text[-4000:]
    assert "out of memory on one caption (id 3): group skipped" in text, text[-4000:]
