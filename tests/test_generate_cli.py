"""`online-stablerep generate`: a PNG grid from the cpu_demo preset, errors as exit code 2."""

from __future__ import annotations

import argparse

import pytest
from PIL import Image

from online_stablerep.commands import generate


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    return generate.run(parser.parse_args(argv))


def test_writes_a_grid_and_prints_images_per_second(tmp_path, capsys):
    captions = tmp_path / "captions.txt"
    captions.write_text("a red kite over a beach\na bowl of ramen\na snowy street\n")
    out = tmp_path / "grid.png"
    code = _run(["--config", "cpu_demo", "--captions", str(captions), "--num", "3",
                 "--out", str(out), "generator.steps=2", "producer.images_per_caption=2",
                 "producer.captions_per_call=2", "batch.views_per_caption=2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "6 images from 3 captions" in printed and "images/s" in printed
    grid = Image.open(out)
    # Three rows of 128 px cells plus a title and margins; two images and a text column.
    assert grid.height >= 3 * 128 and grid.width >= 2 * 128 + 300


def test_bad_captions_and_bad_config_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff\n")
    assert _run(["--captions", str(bad), "--out", str(tmp_path / "g.png")]) == 2
    assert "bad.txt:2: undecodable bytes" in capsys.readouterr().err
    assert _run(["generator.steps=0"]) == 2
    assert "generator.steps" in capsys.readouterr().err


@pytest.mark.slow
def test_the_toy_models_fast_recipe_runs_the_shipped_student(tmp_path, capsys):
    # generator.model=toy generator.recipe=fast: the shipped LCM-LoRA student through the real
    # recipe (the teacher's guided first step, then LCM steps) in the preview command.
    captions = tmp_path / "captions.txt"
    captions.write_text("a fractal of kind 3\na fractal of kind 7\n")
    out = tmp_path / "grid.png"
    code = _run(["--config", "cpu_demo", "--captions", str(captions), "--num", "2",
                 "--out", str(out), "generator.recipe=fast", "generator.compile=false",
                 "producer.images_per_caption=2", "producer.captions_per_call=2",
                 "batch.views_per_caption=2"])
    assert code == 0
    assert "4 images from 2 captions" in capsys.readouterr().out
    assert Image.open(out).height >= 2 * 128
