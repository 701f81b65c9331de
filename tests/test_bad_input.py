"""Every bad input ends with exit code 2 and one line naming the key, file or value and what to
do, without a traceback, before any model is built (issue 9, "Bad input").

The table runs the check launch/train.sh runs before starting any rank
(`online_stablerep.commands.ranks --world N`, in this process); two cases run the real `train`
command in a fresh process, which runs the same check on every rank.
"""

import pytest

from online_stablerep.commands import ranks
from tests.helpers import run_cli


def corpus(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


CASES = {
    # id: (overrides built from tmp_path, world size, text the message must name)
    "unknown key": (lambda t: ["train.stepz=3"], 2, "train.stepz"),
    "wrong type": (lambda t: ["train.steps=many"], 2, "train.steps"),
    "bad value": (lambda t: ["batch.views_per_caption=1"], 2, "batch.views_per_caption"),
    "startup budget below timeout": (
        lambda t: ["transport.timeout_s=100", "transport.startup_timeout_s=10"], 2,
        "transport.startup_timeout_s"),
    "missing corpus": (lambda t: [f"captions.path={t / 'missing.txt'}"], 2, "missing.txt"),
    "empty corpus": (lambda t: [f"captions.path={corpus(t, 'empty.txt', b'')}"], 2,
                     "empty.txt"),
    "corpus without the column": (
        lambda t: [f"captions.path={corpus(t, 'c.csv', b'id,text' + bytes([10]) + b'1,a dog')}"],
        2, "no column 'caption'"),
    "undecodable caption": (
        lambda t: [f"captions.path={corpus(t, 'bad.txt', b'a cat' + bytes([10, 255, 10]))}"],
        2, "bad.txt:2"),
    "model folder missing": (lambda t: [f"generator.model={t / 'sd15'}"], 2, "generator.model"),
    "model folder not diffusers": (lambda t: [f"generator.model={t}"], 2, "model_index.json"),
    "tiny vae missing": (lambda t: [f"generator.tiny_vae={t / 'taesd'}"], 2,
                         "generator.tiny_vae"),
    "output_dir is a file": (lambda t: [f"output_dir={corpus(t, 'out', b'x')}"], 2,
                             "output_dir"),
    "eval dataset missing": (
        lambda t: ["eval.probe_at_end=true", f"eval.dataset={t / 'imagenet'}"], 2,
        "eval.dataset"),
    "layout leaves no trainer": (lambda t: ["roles.generators=2"], 2, "roles.generators"),
    "layout per node does not divide": (lambda t: ["roles.generators=1/node"], 1,
                                        "roles.generators"),
    "unknown backbone": (lambda t: ["model.backbone=vit_nonexistent"], 2, "model.backbone"),
    "ViT size not a multiple of its patch": (
        lambda t: ["model.backbone=vit_tiny_patch16_224", "model.image_size=40"], 2,
        "model.image_size=40"),
    "unshuffled shard smaller than a batch": (
        lambda t: ["roles.generators=0", "captions.shuffle=false",
                   f"captions.path={corpus(t, 'few.txt', b'x' + bytes([10]) * 1 + b'y' + bytes([10]))}",
                   "batch.captions_per_batch=2", "replay.capacity=64"], 2, "captions.shuffle"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_naming_it(tmp_path, capsys, case):
    overrides, world, named = CASES[case]
    args = ["--world", str(world), "--config", "cpu_demo", f"output_dir={tmp_path / 'run'}",
            *overrides(tmp_path)]
    assert ranks.main(args) == 2
    err = capsys.readouterr().err
    assert named in err, err
    assert "Traceback" not in err and err.strip().count("\n") == 0, err


def test_good_input_passes_the_check(tmp_path, capsys):
    assert ranks.main(["--world", "2", "--config", "cpu_demo",
                       f"output_dir={tmp_path / 'run'}"]) == 0
    assert capsys.readouterr().out.split() == ["2", str(tmp_path / "run")]


@pytest.mark.slow
@pytest.mark.parametrize("override, named", [
    ("roles.generators=1", "roles.generators"),  # a single process has no room for a generator
    ("eval.dataset={tmp}/imagenet", "eval.dataset"),
])
def test_train_command_refuses_bad_input_before_starting_the_rank(tmp_path, override, named):
    run = tmp_path / "run"
    result = run_cli(["train", "--config", "cpu_procedural", f"output_dir={run}",
                      "eval.probe_at_end=true", override.format(tmp=tmp_path)], timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert named in result.stderr and "Traceback" not in result.stderr, result.stderr
    # The input check runs before the rank's last word "running", the process group, the
    # config copy and any model: none of them was made.
    assert not (run / "ranks").exists() and not (run / "config.yaml").exists()
    assert not (run / "checkpoints").exists() and not (run / "tensorboard").exists()
