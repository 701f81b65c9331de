"""The toy text-to-image model: its world, its training command, and the shipped folder."""

from __future__ import annotations

import colorsys
import json

import pytest
import torch

from online_stablerep.cli import main
from online_stablerep.config import load_config
from online_stablerep.config.schema import GeneratorConfig
from online_stablerep.fractals import render_alpha, render_images
from online_stablerep.producers.captions import CaptionSource, packaged_captions_path
from online_stablerep.producers.diffusion import DiffusionProducer
from online_stablerep.producers.pipeline import SHIPPED_MODELS, build_components
from online_stablerep.toy.models import classify, load_classifier
from online_stablerep.toy.world import (
    COLOURS,
    TOY_CATEGORIES,
    TOY_NUM_MAPS,
    TOY_NUM_POINTS,
    TOY_RESOLUTION,
    TOY_SEED,
    caption,
    colourise,
    corpus,
    parse_caption,
    render_bank,
)

TOY_DIR = SHIPPED_MODELS["toy"]
shipped = pytest.mark.skipif(not (TOY_DIR / "model_index.json").is_file(),
                             reason="the toy model folder is not in this checkout")


def test_captions_round_trip_and_reject_others():
    assert caption(7) == "a fractal of kind 7"
    assert caption(3, "orange") == "an orange fractal of kind 3"
    for c in range(TOY_CATEGORIES):
        assert parse_caption(caption(c)) == (c, None)
        for name in COLOURS:
            assert parse_caption(caption(c, name)) == (c, name)
    for bad in ("a teal fractal of kind 1", "a red bicycle", "fractal 3"):
        with pytest.raises(ValueError, match="not a toy caption"):
            parse_caption(bad)


def test_colour_words_set_the_fractal_hue():
    alpha = torch.full((len(COLOURS), 1, 4, 4), 255, dtype=torch.uint8)
    images = colourise(alpha, list(COLOURS), torch.Generator().manual_seed(0))
    for name, rgb in zip(COLOURS, images[:, :, 0, 0].tolist(), strict=True):
        hue = colorsys.rgb_to_hsv(*rgb)[0]
        distance = min(abs(hue - COLOURS[name]), 1 - abs(hue - COLOURS[name]))
        assert distance <= 0.031, (name, hue)


def test_toy_shapes_are_the_procedural_categories_of_the_probe():
    """The toy world renders the procedural producer's opacity maps: the probe's real renders
    are those maps composited in the renderer's own colours."""
    cfg = load_config("cpu_demo")
    q = cfg.procedural
    assert (cfg.producer.seed, q.num_categories) == (TOY_SEED, TOY_CATEGORIES)
    assert (q.render_size, q.num_points, q.num_maps) == (TOY_RESOLUTION, TOY_NUM_POINTS,
                                                         TOY_NUM_MAPS)
    assert cfg.producer.output_size == TOY_RESOLUTION
    alpha, colour = render_alpha(TOY_SEED, TOY_NUM_MAPS, TOY_NUM_POINTS, TOY_RESOLUTION,
                                 [4, 4], [0, 1])
    fg, bg = colour[:, 0, :, None, None], colour[:, 1, :, None, None]
    composite = torch.from_numpy(bg + alpha * (fg - bg)).mul(255).round().to(torch.uint8)
    assert torch.equal(composite, render_images(cfg, [4, 4], [0, 1]))
    assert torch.equal(render_bank(2)[4], torch.from_numpy(alpha * 255).round().to(torch.uint8))


def test_packaged_corpora_are_the_toy_world():
    assert packaged_captions_path("toy").read_text().splitlines() == corpus(False)
    assert packaged_captions_path("toy_colours").read_text().splitlines() == corpus()[10:]
    cfg = load_config("cpu_demo")
    assert len(CaptionSource.open(cfg.captions)) == TOY_CATEGORIES


@pytest.mark.slow
def test_train_command_writes_a_loadable_diffusers_folder(tmp_path, capsys):
    out = tmp_path / "toy"
    assert main(["train-toy-generator", "--out", str(out), "--steps", "2", "--vae-steps", "1",
                 "--classifier-steps", "1", "--bank", "4", "--eval-every", "1"]) == 0
    assert "saved" in capsys.readouterr().out
    index = json.loads((out / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= index.keys()
    record = json.loads((out / "toy_training.json").read_text())
    assert record["steps_done"] == 2 and [s for s, _ in record["sample_accuracy"]] == [1, 2]
    components = build_components(GeneratorConfig(model=str(out), steps=2, dtype="fp32"), "cpu")
    assert components.resolution == TOY_RESOLUTION
    assert components.scheduler_config["prediction_type"] == "v_prediction"
    load_classifier(out)


def _shipped_groups(*overrides: str):
    cfg = load_config("cpu_demo", ["producer.captions_per_call=10", "captions.shuffle=false",
                                   *overrides])
    producer = DiffusionProducer(cfg, shard=0, num_shards=1)
    producer.start()
    try:
        return producer.next_groups()
    finally:
        producer.close()


@shipped
def test_shipped_model_loads_by_name_and_generates_caption_groups():
    groups = _shipped_groups("producer.captions_per_call=2")
    assert [g.caption for g in groups] == [caption(0), caption(1)]
    assert all(g.images_kchw.shape == (4, 3, 32, 32) for g in groups)
    assert all(g.images_kchw.dtype == torch.uint8 for g in groups)
    # Images of a trained model are not flat noise: the fractal stands out of its background.
    assert all(float(g.images_kchw.float().std()) > 20 for g in groups)


@shipped
def test_shipped_weights_are_trained_generated_images_show_their_category():
    """Random weights make noise the classifier puts at chance (0.1); trained ones do not."""
    groups = _shipped_groups("producer.images_per_caption=4")
    images = torch.cat([g.images_kchw for g in groups])
    labels = torch.tensor([parse_caption(g.caption)[0] for g in groups]).repeat_interleave(4)
    accuracy = float((classify(load_classifier(TOY_DIR), images) == labels).float().mean())
    assert accuracy >= 0.6, accuracy


@shipped
def test_shipped_folder_is_small_and_says_how_it_was_made():
    size = sum(p.stat().st_size for p in TOY_DIR.rglob("*") if p.is_file())
    assert size < 16 * 2**20, size
    record = json.loads((TOY_DIR / "toy_training.json").read_text())
    assert record["command"].startswith("online-stablerep train-toy-generator")
    assert record["steps_done"] >= 1000 and record["wall_s"] > 0
