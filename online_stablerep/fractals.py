"""Formula-driven fractal images (iterated function systems, in the spirit of FractalDB): the
procedural world that the procedural producer streams, the probe's held-out set renders and the
toy model's world is drawn from.

A category ("caption") is one IFS: `procedural.num_maps` contractive affine maps with
probabilities, drawn from (producer.seed, category) alone. Each image of a category is a fresh
chaos-game render with its own points, colour and placement, so the k images of a group are
positives that share a shape and nothing else.

Determinism: image j of category c in stream epoch e uses image index e*k + j and is a pure
function of (seed, c, index). All per-point arithmetic is elementwise float32 numpy (no BLAS
reductions), so an image is bit-identical whether rendered alone or in a batch, on any rank.
"""

from __future__ import annotations

import colorsys
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from online_stablerep.config.schema import Config

# Image indices of held-out renders start here; training uses epoch * k + j, which stays far
# below it for any feasible run, so probe images are never training images.
HELD_OUT_INDEX_OFFSET = 10**6

# Seed-sequence tags that keep category parameters and image renders on separate streams.
_PARAMS_TAG = 0
_IMAGE_TAG = 1
# Filling-rate filter of a parameter draw, measured on a 32x32 canvas (FractalDB-style):
# too low is a dust of points or a line, too high is a blob.
_FILL_GRID = 32
_FILL_RANGE = (0.12, 0.55)
_MAX_ATTEMPTS = 500
# Attractor points kept per category; renders start their chains on them (no burn-in needed).
_ATTRACTOR_POINTS = 1024
# Parallel chaos-game chains per image.
_CHAINS = 256
# Images rendered per numpy pass (bounds memory; results do not depend on it).
_RENDER_CHUNK = 64
# Per-image placement jitter: rotation (radians), scale range, shift (fraction of half-canvas).
# Large enough that a category's renders differ in place and pose (raw pixels of held-out
# renders then probe at about 40% on 100 categories instead of 90%), so a representation has
# to learn the invariance to beat pixels; small enough that a CPU run learns it in minutes.
_MAX_ROTATION = math.radians(45.0)
_SCALE_RANGE = (0.6, 0.95)
_MAX_SHIFT = 0.12
# Pixel opacity after n points landed on it: 1 - 2^-n, saturating softly (a table, not pow).
_ALPHA = (1.0 - 0.5 ** np.arange(25)).astype(np.float32)


@dataclass(frozen=True)
class CategoryIFS:
    """The fixed parameters of one fractal category."""

    # (num_maps, 6) float32 rows [a, b, c, d, e, f]: (x, y) -> (a x + b y + e, c x + d y + f).
    maps: np.ndarray
    # (num_maps,) float32 cumulative map probabilities (last entry 1).
    cumprob: np.ndarray
    # (2,) float32 centre of the attractor's robust bounding box.
    centre: np.ndarray
    # Half of the bounding box's longer side; (p - centre) / half_extent lies in about [-1, 1].
    half_extent: float
    # (_ATTRACTOR_POINTS, 2) float32 points on the attractor.
    attractor: np.ndarray


def caption_text(category: int) -> str:
    """The caption of a procedural category."""
    return f"fractal {category}"


def _iterate(maps: np.ndarray, cumprob: np.ndarray, start: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Run chaos-game chains for a batch of images.

    Args:
        maps: (B, m, 6) affine maps per image.
        cumprob: (B, m) cumulative map probabilities per image.
        start: (B, M, 2) chain starting points.
        u: (B, T, M) uniforms in [0, 1) choosing the map of each step.

    Returns:
        (B, T, M, 2) float32 visited points.
    """
    num_images, num_maps = cumprob.shape
    choice = (u[..., None] >= cumprob[:, None, None, :-1]).sum(-1)  # (B, T, M)
    choice += (np.arange(num_images) * num_maps)[:, None, None]
    coeff = maps.reshape(num_images * num_maps, 6)[choice]  # (B, T, M, 6)
    x, y = start[..., 0], start[..., 1]
    out = np.empty(u.shape + (2,), dtype=np.float32)
    for t in range(u.shape[1]):
        c = coeff[:, t]
        x, y = (
            c[..., 0] * x + c[..., 1] * y + c[..., 4],
            c[..., 2] * x + c[..., 3] * y + c[..., 5],
        )
        out[:, t, :, 0] = x
        out[:, t, :, 1] = y
    return out


def _draw_maps(rng: np.random.Generator, num_maps: int) -> tuple[np.ndarray, np.ndarray]:
    """Random contractive maps and their probabilities (proportional to |det|, floored)."""
    linear = rng.uniform(-1.0, 1.0, size=(num_maps, 2, 2))
    # Rescale each map to a spectral norm in [0.25, 0.85]: contractive, so the attractor exists,
    # and not so contractive that it collapses to a few dots.
    norms = np.linalg.norm(linear, ord=2, axis=(1, 2))
    linear *= (rng.uniform(0.25, 0.85, size=num_maps) / np.maximum(norms, 1e-6))[:, None, None]
    shift = rng.uniform(-1.0, 1.0, size=(num_maps, 2))
    maps = np.concatenate([linear.reshape(num_maps, 4), shift], axis=1).astype(np.float32)
    weight = np.abs(np.linalg.det(linear)) + 0.02
    cumprob = np.cumsum(weight / weight.sum()).astype(np.float32)
    cumprob[-1] = 1.0
    return maps, cumprob


@functools.lru_cache(maxsize=4096)
def category_ifs(seed: int, category: int, num_maps: int) -> CategoryIFS:
    """The IFS of a category: the first parameter draw from (seed, category) that passes the
    filling-rate filter. Cached; the arrays are read-only."""
    for attempt in range(_MAX_ATTEMPTS):
        rng = np.random.default_rng([seed, category, _PARAMS_TAG, attempt])
        maps, cumprob = _draw_maps(rng, num_maps)
        # Start every chain at the fixed point of map 0, which lies on the attractor.
        a, b, c, d, e, f = maps[0].astype(np.float64)
        fixed = np.linalg.solve(np.array([[1 - a, -b], [-c, 1 - d]]), np.array([e, f]))
        start = np.broadcast_to(fixed.astype(np.float32), (1, 512, 2))
        u = rng.random((1, 24, 512), dtype=np.float32)
        points = _iterate(maps[None], cumprob[None], start, u)[0, 8:].reshape(-1, 2)
        lo, hi = np.percentile(points, [0.5, 99.5], axis=0)
        half_extent = float((hi - lo).max() / 2)
        if half_extent < 1e-4:
            continue
        centre = ((lo + hi) / 2).astype(np.float32)
        cells = np.floor(((points - centre) / half_extent * 0.5 + 0.5) * _FILL_GRID)
        cells = np.clip(cells, 0, _FILL_GRID - 1).astype(np.int64)
        fill = np.unique(cells[:, 1] * _FILL_GRID + cells[:, 0]).size / _FILL_GRID**2
        if not _FILL_RANGE[0] <= fill <= _FILL_RANGE[1]:
            continue
        attractor = points[rng.choice(points.shape[0], _ATTRACTOR_POINTS, replace=False)]
        for arr in (maps, cumprob, centre, attractor):
            arr.setflags(write=False)
        return CategoryIFS(maps, cumprob, centre, half_extent, attractor)
    raise RuntimeError(
        f"procedural category {category} (seed {seed}): no IFS draw passed the filling-rate "
        f"filter in {_MAX_ATTEMPTS} attempts"
    )


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32)


def render_alpha(
    seed: int, num_maps: int, num_points: int, render_size: int,
    categories: Sequence[int], indices: Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """The shape and colours of (category, image index) renders, before compositing.

    Returns:
        (B, 1, R, R) float32 opacity in [0, 1] and (B, 2, 3) float32 RGB colours
        (foreground, background). The render is `bg + alpha * (fg - bg)`.
    """
    ifs = [category_ifs(seed, c, num_maps) for c in categories]
    steps = math.ceil(num_points / _CHAINS)
    num_images = len(categories)
    u = np.empty((num_images, steps, _CHAINS), dtype=np.float32)
    start = np.empty((num_images, _CHAINS, 2), dtype=np.float32)
    jitter = np.empty((num_images, 4), dtype=np.float32)
    colour = np.empty((num_images, 2, 3), dtype=np.float32)
    # 1. Every random number of image i comes from its own generator, in a fixed order.
    for i, (c, index) in enumerate(zip(categories, indices, strict=True)):
        rng = np.random.default_rng([seed, c, _IMAGE_TAG, index])
        u[i] = rng.random((steps, _CHAINS), dtype=np.float32)
        start[i] = ifs[i].attractor[rng.integers(0, _ATTRACTOR_POINTS, _CHAINS)]
        spin, size, dx, dy = rng.random(4)
        angle = (2 * spin - 1) * _MAX_ROTATION
        scale = _SCALE_RANGE[0] + (_SCALE_RANGE[1] - _SCALE_RANGE[0]) * size
        # Trigonometry per image in Python floats, so no vectorised libm enters the pixels.
        jitter[i] = (scale * math.cos(angle), scale * math.sin(angle),
                     (2 * dx - 1) * _MAX_SHIFT, (2 * dy - 1) * _MAX_SHIFT)
        hue, sat, val, bg_hue, bg_sat, bg_val = rng.random(6)
        # Fixed polarity: a bright saturated fractal on a dark background.
        colour[i, 0] = _hsv_to_rgb(hue, 0.5 + 0.5 * sat, 0.8 + 0.2 * val)
        colour[i, 1] = _hsv_to_rgb(bg_hue, 0.5 * bg_sat, 0.2 * bg_val)
    # 2. Chaos game for all images at once.
    maps = np.stack([f.maps for f in ifs])
    cumprob = np.stack([f.cumprob for f in ifs])
    points = _iterate(maps, cumprob, start, u).reshape(num_images, -1, 2)
    # 3. Normalise to the category's box, then jitter rotation, scale and shift per image.
    centre = np.stack([f.centre for f in ifs])[:, None, :]
    half = np.array([f.half_extent for f in ifs], dtype=np.float32)[:, None, None]
    points = (points - centre) / half
    cos, sin, shift_x, shift_y = jitter.T[:, :, None]  # four (B, 1) columns
    px = cos * points[..., 0] - sin * points[..., 1] + shift_x
    py = sin * points[..., 0] + cos * points[..., 1] + shift_y
    # 4. Splat points into per-image count maps, then opacity from the count.
    col = np.floor((px * 0.5 + 0.5) * render_size).astype(np.int64)
    row = np.floor((py * 0.5 + 0.5) * render_size).astype(np.int64)
    inside = (col >= 0) & (col < render_size) & (row >= 0) & (row < render_size)
    flat = (np.arange(num_images)[:, None] * render_size + row) * render_size + col
    counts = np.bincount(flat[inside], minlength=num_images * render_size**2)
    counts = np.minimum(counts, _ALPHA.size - 1).reshape(num_images, 1, render_size, render_size)
    return _ALPHA[counts], colour


def _render_chunk(
    seed: int, num_maps: int, num_points: int, render_size: int,
    categories: Sequence[int], indices: Sequence[int],
) -> np.ndarray:
    """(B, 3, R, R) float32 renders in [0, 1] of (category, image index) pairs."""
    alpha, colour = render_alpha(seed, num_maps, num_points, render_size, categories, indices)
    fg, bg = colour[:, 0, :, None, None], colour[:, 1, :, None, None]
    return bg + alpha * (fg - bg)


def render_images(cfg: Config, categories: Sequence[int], indices: Sequence[int]) -> torch.Tensor:
    """Render (category, image index) pairs.

    Args:
        cfg: uses producer.seed, producer.output_size and the procedural section.
        categories: category ids, one per image.
        indices: image indices, one per image (training uses epoch * k + j).

    Returns:
        (len(categories), 3, S, S) uint8 with S = producer.output_size.
    """
    if len(categories) != len(indices):
        raise ValueError(f"{len(categories)} categories but {len(indices)} image indices")
    q, out_size = cfg.procedural, cfg.producer.output_size
    for c in categories:
        if not 0 <= c < q.num_categories:
            raise ValueError(f"category {c} not in [0, procedural.num_categories={q.num_categories})")
    chunks = []
    for lo in range(0, len(categories), _RENDER_CHUNK):
        hi = lo + _RENDER_CHUNK
        chunk = _render_chunk(
            cfg.producer.seed, q.num_maps, q.num_points, q.render_size,
            categories[lo:hi], indices[lo:hi],
        )
        images = torch.from_numpy(chunk)
        if q.render_size != out_size:
            images = F.interpolate(
                images, size=(out_size, out_size), mode="bilinear", antialias=True,
                align_corners=False,
            )
        chunks.append((images * 255).round_().clamp_(0, 255).to(torch.uint8))
    if not chunks:
        return torch.empty(0, 3, out_size, out_size, dtype=torch.uint8)
    return torch.cat(chunks)
