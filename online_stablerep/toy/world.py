"""The toy world the shipped text-to-image model was trained on: procedural fractal categories
named in words, with an optional colour word.

A caption is "a fractal of kind 7" (any colour, as the procedural renderer draws it) or "a red
fractal of kind 7" (the fractal in that hue). The shapes are the procedural producer's own
categories for `producer.seed=TOY_SEED`, rendered at `TOY_RESOLUTION` px, so the probe of a
backbone trained on generated images runs on real renders of the same categories
(`procedural.num_categories=TOY_CATEGORIES`, `procedural.render_size=TOY_RESOLUTION`).
Training images use image indices below the probe's held-out offset: the model never sees a
probe image.
"""

from __future__ import annotations

import colorsys
import re

import numpy as np
import torch

from online_stablerep.fractals import render_alpha

# The procedural world of the toy model: categories 0..TOY_CATEGORIES-1 of producer.seed=0.
TOY_SEED = 0
TOY_CATEGORIES = 10
TOY_RESOLUTION = 32
TOY_NUM_POINTS = 6000
TOY_NUM_MAPS = 4

# Colour words and their hue centres (fraction of the colour wheel).
COLOURS: dict[str, float] = {
    "red": 0.0, "orange": 30 / 360, "yellow": 60 / 360, "green": 120 / 360,
    "cyan": 180 / 360, "blue": 225 / 360, "purple": 275 / 360, "pink": 320 / 360,
}
# Half-width of a colour word's hue band.
_HUE_JITTER = 0.03
_CAPTION_RE = re.compile(r"^an? (?:(\w+) )?fractal of kind (\d+)$")


def caption(category: int, colour: str | None = None) -> str:
    """The caption of a category, optionally with a colour word."""
    if colour is None:
        return f"a fractal of kind {category}"
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r} (known: {', '.join(COLOURS)})")
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} fractal of kind {category}"


def parse_caption(text: str) -> tuple[int, str | None]:
    """(category, colour or None) of a toy caption.

    Raises:
        ValueError: for text that is not a toy caption.
    """
    match = _CAPTION_RE.match(text.strip())
    if match is None or (match.group(1) is not None and match.group(1) not in COLOURS):
        raise ValueError(f"not a toy caption: {text!r}")
    return int(match.group(2)), match.group(1)


def render_bank(num_per_category: int, first_index: int = 0) -> torch.Tensor:
    """Opacity maps of `num_per_category` renders of every toy category.

    Returns:
        (TOY_CATEGORIES, num_per_category, 1, R, R) uint8 opacity (255 = fractal).
    """
    out = torch.empty(TOY_CATEGORIES, num_per_category, 1, TOY_RESOLUTION, TOY_RESOLUTION,
                      dtype=torch.uint8)
    for c in range(TOY_CATEGORIES):
        for lo in range(0, num_per_category, 256):
            hi = min(lo + 256, num_per_category)
            alpha, _ = render_alpha(TOY_SEED, TOY_NUM_MAPS, TOY_NUM_POINTS, TOY_RESOLUTION,
                                    [c] * (hi - lo), range(first_index + lo, first_index + hi))
            out[c, lo:hi] = torch.from_numpy(np.rint(alpha * 255)).to(torch.uint8)
    return out


def _hsv(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, 3) RGB from (B,) hue, saturation, value in [0, 1]."""
    return torch.tensor([colorsys.hsv_to_rgb(*hsv) for hsv in zip(h.tolist(), s.tolist(),
                                                                   v.tolist(), strict=True)])


def colourise(alpha_b1hw: torch.Tensor, colours: list[str | None],
              generator: torch.Generator) -> torch.Tensor:
    """Composite opacity maps into RGB images with the procedural renderer's colour law: a bright
    saturated fractal on a dark background; the fractal's hue is the colour word's band, or
    uniform when the caption has none.

    Returns:
        (B, 3, R, R) float32 in [0, 1].
    """
    b = alpha_b1hw.shape[0]
    u = torch.rand(b, 6, generator=generator)
    hue = u[:, 0]
    for i, name in enumerate(colours):
        if name is not None:
            hue[i] = (COLOURS[name] + (2 * u[i, 0] - 1) * _HUE_JITTER) % 1.0
    fg = _hsv(hue, 0.5 + 0.5 * u[:, 1], 0.8 + 0.2 * u[:, 2])
    bg = _hsv(u[:, 3], 0.5 * u[:, 4], 0.2 * u[:, 5])
    alpha = alpha_b1hw.float() / 255
    return bg[:, :, None, None] + alpha * (fg - bg)[:, :, None, None]


def corpus(colour_captions: bool = True) -> list[str]:
    """Every toy caption: plain ones first, then one per (colour, category)."""
    plain = [caption(c) for c in range(TOY_CATEGORIES)]
    if not colour_captions:
        return plain
    return plain + [caption(c, name) for name in COLOURS for c in range(TOY_CATEGORIES)]
