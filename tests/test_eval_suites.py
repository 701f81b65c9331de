"""Named transfer suites and few-shot episodes: the episodes' draw, the nearest-prototype
classifier against a naive loop, the suite's images and cache, probe.json, and the probe
command's answers to bad input."""

from __future__ import annotations

import dataclasses
import importlib
import json

import pytest
import torch
import torch.nn.functional as F

from online_stablerep.config import load_config
from online_stablerep.eval import probe_encoders, write_probe_json
from online_stablerep.eval import suites as suites_module
from online_stablerep.eval.few_shot import draw_episodes, few_shot_accuracy
from online_stablerep.eval.suites import SUITE_INDEX_OFFSET, SUITES, suite_data
from online_stablerep.training.checkpoint import save_checkpoint
from tests.helpers import render_category_images

# procedural100's protocol on a handful of small renders: seconds, not a minute.
TINY_SUITE = dataclasses.replace(
    SUITES["procedural100"], num_categories=8, num_points=600, train_per_class=4,
    test_per_class=4, few_shot_first_class=2, ways=3, shots=(1, 2), queries=2, episodes=50,
)


@pytest.fixture
def tiny_suite(monkeypatch):
    monkeypatch.setitem(SUITES, "tiny", TINY_SUITE)
    # config validates suite names from its own list (it cannot import eval)
    # (the package exports a function of the same name, so the module comes by import_module)
    validation = importlib.import_module("online_stablerep.config.validate")
    monkeypatch.setattr(validation, "EVAL_SUITES", (*validation.EVAL_SUITES, "tiny"))
    monkeypatch.setattr(suites_module, "_MEMORY", {})
    return TINY_SUITE


def test_episodes_take_distinct_classes_and_disjoint_images():
    labels = torch.arange(10).repeat_interleave(6)
    eps = draw_episodes(labels, list(range(3, 10)), ways=4, shots=2, queries=3, episodes=40,
                        seed=0)
    assert eps.support.shape == (40, 4, 2) and eps.query.shape == (40, 4, 3)
    for e in range(40):
        classes = labels[eps.support[e, :, 0]]
        assert len(set(classes.tolist())) == 4 and classes.min() >= 3
        for w in range(4):
            together = torch.cat([eps.support[e, w], eps.query[e, w]])
            assert len(set(together.tolist())) == 5
            assert torch.all(labels[together] == classes[w])
    again = draw_episodes(labels, list(range(3, 10)), 4, 2, 3, 40, seed=0)
    assert torch.equal(again.support, eps.support) and torch.equal(again.query, eps.query)


def test_episodes_refuse_classes_too_small_or_too_few():
    labels = torch.arange(4).repeat_interleave(3)
    with pytest.raises(ValueError, match="need 4"):
        draw_episodes(labels, [0, 1, 2, 3], ways=2, shots=1, queries=3, episodes=2, seed=0)
    with pytest.raises(ValueError, match="5-way"):
        draw_episodes(labels, [0, 1, 2, 3], ways=5, shots=1, queries=1, episodes=2, seed=0)


def test_nearest_prototype_matches_a_naive_loop():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(6).repeat_interleave(8)
    features = torch.randn(6, 16, generator=gen)[labels] + 1.5 * torch.randn(48, 16, generator=gen)
    base = torch.randn(16, generator=gen)
    eps = draw_episodes(labels, list(range(6)), ways=3, shots=2, queries=4, episodes=30, seed=1)
    result = few_shot_accuracy(features, base, eps)
    x = F.normalize(features - base, dim=1)
    accs = []
    for e in range(30):
        protos = [F.normalize(x[eps.support[e, w]].mean(0), dim=0) for w in range(3)]
        hits = [int(max(range(3), key=lambda w: float(x[i] @ protos[w])) == w_true)
                for w_true in range(3) for i in eps.query[e, w_true].tolist()]
        accs.append(sum(hits) / len(hits))
    mean = sum(accs) / 30
    std = (sum((a - mean) ** 2 for a in accs) / 29) ** 0.5
    assert result.mean == pytest.approx(mean, abs=1e-6)
    assert result.ci95 == pytest.approx(1.96 * std / 30**0.5, abs=1e-6)
    assert 0.34 < result.mean < 1.0  # informative features, some errors


def test_separated_classes_score_one_and_noise_scores_chance():
    labels = torch.arange(10).repeat_interleave(20)
    eps = draw_episodes(labels, list(range(10)), ways=5, shots=1, queries=15, episodes=300,
                        seed=0)
    clean = few_shot_accuracy(torch.eye(10)[labels] * 5, torch.zeros(10), eps)
    assert clean.mean == 1.0 and clean.ci95 == 0.0
    noise = torch.randn(200, 64, generator=torch.Generator().manual_seed(0))
    chance = few_shot_accuracy(noise, noise.mean(0), eps)
    assert abs(chance.mean - 0.2) < 3 * chance.ci95 + 0.01


def test_suite_images_are_labelled_held_out_renders_and_cached(tiny_suite, tmp_path,
                                                              monkeypatch):
    train, test = suite_data(tiny_suite, str(tmp_path))
    assert len(train) == len(test) == 32
    assert train.images_nchw.shape[1:] == (3, 32, 32)
    assert test.labels.tolist() == [c for c in range(8) for _ in range(4)]
    cfg = load_config(None, ["procedural.num_categories=8", "procedural.render_size=32",
                             "procedural.num_points=600", "producer.output_size=32",
                             "producer.seed=0"])
    offset = SUITE_INDEX_OFFSET + 4  # test split indices follow the train split's
    assert torch.equal(test.images_nchw[8:12],
                       render_category_images(cfg, 2, range(offset, offset + 4)))
    (cached,) = tmp_path.glob("suite-*.pt")
    # A new process (empty memory) loads the file instead of rendering.
    monkeypatch.setattr(suites_module, "_MEMORY", {})
    monkeypatch.setattr(suites_module, "_render", lambda suite: pytest.fail("rendered again"))
    train2, test2 = suite_data(tiny_suite, str(tmp_path))
    assert torch.equal(train2.images_nchw, train.images_nchw)
    assert torch.equal(test2.labels, test.labels)
    assert cached.name == f"suite-{tiny_suite.key()}.pt"
    assert dataclasses.replace(tiny_suite, episodes=51).key() != tiny_suite.key()


def small_encoder(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten()).eval()


def test_probe_on_a_suite_adds_few_shot_figures(tiny_suite, tmp_path):
    cfg = load_config(None, ["eval.suite=tiny", "model.image_size=24", "eval.epochs=5",
                             "eval.knn_k=3"])
    results = probe_encoders(cfg, {"trained": small_encoder(0)}, "cpu")
    for name in ("trained", "pixels"):
        for key in ("fewshot_3way_1shot", "fewshot_3way_2shot"):
            assert 0.0 <= results[name][key] <= 1.0 and results[name][key + "_ci95"] >= 0.0
    # Pixels see colour and shape: better than chance (1/3) on these renders.
    assert results["pixels"]["fewshot_3way_2shot"] > 0.4
    summary = write_probe_json(results, tmp_path / "probe.json", suite="tiny")
    stored = json.loads((tmp_path / "probe.json").read_text())
    assert stored == summary
    assert stored["suite"] == "tiny" and stored["headline"] == "linear_top1"
    assert stored["fewshot_3way_1shot"] == results["trained"]["fewshot_3way_1shot"]


def _probe(argv: list[str]) -> int:
    from online_stablerep.cli import build_parser
    from online_stablerep.commands import probe

    return probe.run(build_parser().parse_args(["probe", *argv]))


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.slow  # builds models and loads a checkpoint: ~10 s on a busy machine
def test_probe_command_answers_bad_input_with_one_line(tmp_path, capsys):
    # Unknown suite: a config error before anything is built.
    assert _probe(["--suite", "procedural1000", f"output_dir={tmp_path}"]) == 2
    assert "eval.suite" in _one_line(capsys.readouterr().err)
    # No checkpoint at all.
    assert _probe(["--suite", "procedural100", f"output_dir={tmp_path / 'none'}"]) == 2
    assert "no complete checkpoint" in _one_line(capsys.readouterr().out)
    # A checkpoint of another architecture than the config's.
    cfg = load_config("cpu_procedural", ["model.head_hidden_dim=64", "model.embed_dim=32"])
    from online_stablerep.models.encoder import build_model

    save_checkpoint(tmp_path / "run", 1, build_model(cfg.model).state_dict(), {}, None, keep=1)
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000001"
    assert _probe(["--checkpoint", str(checkpoint), "--suite", "procedural100",
                   "model.backbone=resnet18"]) == 2
    line = _one_line(capsys.readouterr().out)
    assert "model.backbone='resnet18'" in line and "--config" in line
    # A missing ImageFolder root.
    assert _probe(["--checkpoint", str(checkpoint), "model.head_hidden_dim=64",
                   "model.embed_dim=32", f"eval.dataset={tmp_path / 'nowhere'}"]) == 2
    assert "nowhere" in _one_line(capsys.readouterr().out)


def test_config_lists_the_same_suites_as_the_registry():
    # config cannot import eval (layers), so it keeps the names; they must agree.
    from online_stablerep.config.validate import EVAL_SUITES
    from online_stablerep.eval.suites import SUITES

    assert set(EVAL_SUITES) == set(SUITES)
