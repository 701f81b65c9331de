"""Named transfer suites: fixed labelled sets of real images that no training run sees, with a
fixed protocol, so runs of any config are scored on the same yardstick (docs/evaluation.md).

`procedural100` is the toy model's transfer test: real renders of 100 procedural fractal
categories of producer seed 0 at 32 px. The toy text-to-image model (docs/toy-model.md) was
captioned with only the first 10 of them; the other 90 are shapes an encoder trained on its
images has never been told about, so the suite measures what transfers, as the paper's linear
probes on datasets other than the training captions' do. Few-shot episodes draw only from those
90 novel categories.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from online_stablerep.config.schema import Config
from online_stablerep.eval.datasets import TensorImages
from online_stablerep.fractals import render_images

# Image indices of suite renders start here: above the probe's held-out range
# (HELD_OUT_INDEX_OFFSET + a few thousand) and far above any training index.
SUITE_INDEX_OFFSET = 2 * 10**6


@dataclass(frozen=True)
class TransferSuite:
    """The images and protocol of one named suite."""

    # One line for `--help` and probe.json.
    summary: str
    # producer.seed whose procedural categories the suite renders.
    seed: int
    # Categories 0..num_categories-1 (the linear probe and k-NN are num_categories-way).
    num_categories: int
    # Render side in pixels (the images are stored at this size).
    render_size: int
    # Chaos-game points per render.
    num_points: int
    # Affine maps per category.
    num_maps: int
    # Images per category in the probe's train split.
    train_per_class: int
    # Images per category in the test split (the few-shot episodes draw from it too).
    test_per_class: int
    # First category few-shot episodes may use (the ones before are the training captions').
    few_shot_first_class: int
    # Classes per few-shot episode.
    ways: int
    # Support images per class, one episode set per value.
    shots: tuple[int, ...]
    # Query images per class and episode.
    queries: int
    # Episodes per shot count.
    episodes: int
    # probe.json key of the figure quoted first (see docs/evaluation.md for why this one).
    headline: str

    def key(self) -> str:
        """A digest of every field: a cached image set is reused only by an identical suite."""
        fields = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(fields.encode()).hexdigest()[:16]


SUITES: dict[str, TransferSuite] = {
    "procedural100": TransferSuite(
        summary="real renders of 100 procedural categories at 32 px (the toy model knows the "
                "first 10): 100-way linear probe and k-NN, 5-way few-shot on the other 90",
        seed=0, num_categories=100, render_size=32, num_points=6000, num_maps=4,
        train_per_class=20, test_per_class=20, few_shot_first_class=10,
        ways=5, shots=(1, 5), queries=15, episodes=600,
        headline="linear_top1",
    ),
}


def get_suite(name: str) -> TransferSuite:
    """The suite called `name`.

    Raises:
        ValueError: naming eval.suite for an unknown name.
    """
    if name not in SUITES:
        raise ValueError(f"eval.suite={name!r} is not one of {', '.join(SUITES)} "
                         "(or \"\" for eval.dataset)")
    return SUITES[name]


def _render(suite: TransferSuite) -> tuple[TensorImages, TensorImages]:
    cfg = Config()
    cfg.producer.seed = suite.seed
    cfg.producer.output_size = suite.render_size
    cfg.procedural = dataclasses.replace(
        cfg.procedural, num_categories=suite.num_categories, render_size=suite.render_size,
        num_points=suite.num_points, num_maps=suite.num_maps,
    )

    def split(first: int, count: int) -> TensorImages:
        categories = [c for c in range(suite.num_categories) for _ in range(count)]
        indices = [SUITE_INDEX_OFFSET + first + j
                   for _ in range(suite.num_categories) for j in range(count)]
        return TensorImages(render_images(cfg, categories, indices), torch.tensor(categories),
                            suite.num_categories)

    return split(0, suite.train_per_class), split(suite.train_per_class, suite.test_per_class)


# Rendered suites of this process, by suite key.
_MEMORY: dict[str, tuple[TensorImages, TensorImages]] = {}


def suite_data(suite: TransferSuite, cache_dir: str = "") -> tuple[TensorImages, TensorImages]:
    """(train, test) images of `suite`, rendered once per process and, with `cache_dir`, once
    per machine (a .pt file of uint8 tensors named by the suite's digest)."""
    key = suite.key()
    if key in _MEMORY:
        return _MEMORY[key]
    path = Path(cache_dir) / f"suite-{key}.pt" if cache_dir else None
    if path is not None and path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        data = tuple(TensorImages(stored[f"{s}_images"], stored[f"{s}_labels"],
                                  suite.num_categories) for s in ("train", "test"))
    else:
        data = _render(suite)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".pt.tmp")
            torch.save({f"{s}_{field}": getattr(part, attr) for s, part in zip(
                ("train", "test"), data, strict=True)
                for field, attr in (("images", "images_nchw"), ("labels", "labels"))}, tmp)
            tmp.replace(path)
    _MEMORY[key] = data
    return data
