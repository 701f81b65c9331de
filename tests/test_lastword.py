"""Last words: what each rank records on its way out, and the wrapper's one line naming the rank
to blame and its role (jobs/shutdown.py)."""

import os
import signal

import pytest

from online_stablerep.jobs.shutdown import (
    StopRequest,
    main,
    read_last_words,
    summarize,
    write_last_word,
)


def test_last_words_round_trip_and_a_missing_one_reads_as_none(tmp_path):
    write_last_word(tmp_path, 0, "trainer", "finished")
    write_last_word(tmp_path, 1, "generator", "failed", "RuntimeError: boom", "own", 1)
    words = read_last_words(tmp_path, 3)
    assert words[0]["role"] == "trainer" and words[0]["pid"] == os.getpid()
    assert words[1]["reason"] == "RuntimeError: boom" and words[2] is None


def test_writing_into_an_unusable_output_dir_does_not_raise(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    write_last_word(blocker, 0, "trainer", "running")


def word(role, status, reason="", cause="", code=0):
    return {"role": role, "status": status, "reason": reason, "cause": cause, "code": code}


@pytest.mark.parametrize("words, line, code", [
    ({0: word("trainer", "finished"), 1: word("generator", "finished")},
     "job finished", 0),
    # the launcher stopped the trainer after the generator vanished: the generator is named
    ({0: word("trainer", "failed", "generator rank 1: connection closed", "peer", 1),
      1: word("generator", "running")},
     "job failed: rank 1 (generator) died without a last word", 1),
    ({0: word("trainer", "stopped", "SIGTERM received by rank 0 (trainer)", code=143),
      1: None},
     "job failed: rank 1 died without a last word", 1),
    # a rank's own error wins over the peers that failed because of it
    ({0: word("trainer", "failed", "trainer rank 0: generator rank 2 failed", "peer", 1),
      1: word("trainer", "failed", "NonFiniteLossError: non-finite loss", "own", 1),
      2: word("generator", "failed", "RuntimeError: renderer exploded", "own", 1)},
     "job failed: rank 1 (trainer) failed: NonFiniteLossError", 1),
    ({0: word("trainer", "failed", "trainer rank 0: generator rank 1 stopped answering",
              "peer", 1),
      1: word("generator", "failed", "generator rank 1: trainer rank 0 aborted", "peer", 1)},
     "job failed: rank 0 (trainer) failed: trainer rank 0: generator rank 1 stopped answering",
     1),
    ({0: word("trainer", "stopped", "SIGTERM received by rank 0 (trainer)", code=143),
      1: word("generator", "finished")},
     "job stopped: SIGTERM received by rank 0 (trainer)", 143),
])
def test_summary_names_the_rank_to_blame_and_its_role(words, line, code):
    text, exit_code = summarize(words, launcher_code=1 if code else 0)
    assert text.startswith(line), text
    assert exit_code == code


def test_report_command_prints_one_line_and_exits_with_the_jobs_code(tmp_path, capsys):
    write_last_word(tmp_path, 0, "trainer", "failed", "generator rank 1: connection closed",
                    "peer", 1)
    write_last_word(tmp_path, 1, "generator", "running")
    assert main([str(tmp_path), "--world", "2", "--code", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rank 1 (generator) died without a last word" in err


@pytest.mark.parametrize("node, line", [
    # node 1's launcher saw rank 3 die: its own rank with no final word
    (1, "job failed: rank 3 (generator) died without a last word"),
    # node 0 shares output_dir: rank 3 left "running" on node 1 and is named on node 0 too
    (0, "job failed: rank 3 (generator) on another node died without a last word"),
])
def test_two_nodes_each_name_the_rank_killed_on_node_1(node, line):
    words = {0: word("trainer", "failed", "trainer rank 0: generator rank 3: closed", "peer", 1),
             1: word("generator", "failed", "generator rank 1: trainer rank 0 aborted", "peer",
                     1),
             2: word("trainer", "failed", "trainer rank 2: generator rank 3: closed", "peer", 1),
             3: word("generator", "running")}
    text, code = summarize(words, 1, local=range(2 * node, 2 * node + 2))
    assert text.startswith(line) and code == 1, text


def test_another_nodes_missing_words_are_not_blamed_when_output_dir_is_not_shared():
    # Node 0 sees only its own words: its peers' failure is reported, naming the lost rank.
    words = {0: word("trainer", "failed", "trainer rank 0: generator rank 3: closed", "peer", 1),
             1: word("generator", "failed", "generator rank 1: trainer rank 0 aborted", "peer",
                     1),
             2: None, 3: None}
    text, _ = summarize(words, 1, local=range(0, 2))
    assert text.startswith("job failed: rank 0 (trainer) failed: trainer rank 0: generator rank 3")


def test_report_waits_for_the_other_nodes_final_words(tmp_path, capsys):
    import threading

    for rank, role in enumerate(["trainer", "generator", "trainer", "generator"]):
        write_last_word(tmp_path, rank, role, "running")
    write_last_word(tmp_path, 0, "trainer", "failed", "rank 0: generator rank 3: closed", "peer",
                    1)
    write_last_word(tmp_path, 1, "generator", "failed", "rank 1: trainer rank 0 aborted", "peer",
                    1)
    # Rank 2 (node 1) fails a moment later; rank 3 was killed and stays "running".
    threading.Timer(0.6, write_last_word, (tmp_path, 2, "trainer", "failed",
                                           "rank 2: generator rank 3: closed", "peer", 1)).start()
    assert main([str(tmp_path), "--world", "4", "--code", "1", "--node-rank", "0",
                 "--ranks-per-node", "2", "--wait-s", "3"]) == 1
    assert "rank 3 (generator) on another node died" in capsys.readouterr().err


def test_stop_request_takes_the_first_signal_and_ignores_repeated_sigterms():
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    seen = []
    try:
        stop = StopRequest()
        stop.install(seen.append)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher forwards the same stop again
        assert stop.is_set() and stop.signal_name == "SIGTERM" and stop.exit_code == 143
        assert seen == ["SIGTERM"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C stops at once
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_a_vanished_rank_is_closed_by_its_node_so_other_nodes_need_not_wait(tmp_path, capsys,
                                                                          monkeypatch):
    from online_stablerep.jobs import shutdown

    for rank, role in enumerate(["trainer", "generator", "trainer", "generator"]):
        write_last_word(tmp_path, rank, role, "running")
    write_last_word(tmp_path, 2, "trainer", "failed", "rank 2: generator rank 3: closed", "peer",
                    1)
    write_last_word(tmp_path, 0, "trainer", "failed", "rank 0: generator rank 3: closed", "peer",
                    1)
    write_last_word(tmp_path, 1, "generator", "failed", "rank 1: trainer rank 0 aborted", "peer",
                    1)
    # Node 1's report: rank 3 vanished; its word becomes "died", keeping role and pid.
    pid = read_last_words(tmp_path, 4)[3]["pid"]
    assert main([str(tmp_path), "--world", "4", "--code", "1", "--node-rank", "1",
                 "--ranks-per-node", "2", "--wait-s", "30"]) == 1
    assert "job failed: rank 3 (generator) died without a last word" in capsys.readouterr().err
    closed = read_last_words(tmp_path, 4)[3]
    assert (closed["status"], closed["role"], closed["pid"]) == ("died", "generator", pid)
    # Node 0's report, sharing output_dir, finds nothing pending: it answers at once (it
    # waited --wait-s for a "running" rank 3 before).
    def no_waiting(seconds):
        raise AssertionError("node 0 waited for a word")

    monkeypatch.setattr(shutdown.time, "sleep", no_waiting)
    assert main([str(tmp_path), "--world", "4", "--code", "1", "--node-rank", "0",
                 "--ranks-per-node", "2", "--wait-s", "30"]) == 1
    assert "rank 3 (generator) on another node died" in capsys.readouterr().err
