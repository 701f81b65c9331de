"""A preview grid of caption groups: one row per caption, its k images, caption and guidance."""

from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw, ImageFont

from online_stablerep.records import CaptionGroup

_BACKGROUND = (250, 250, 247)
_TEXT = (30, 30, 30)
_MUTED = (110, 110, 110)
_RULE = (222, 222, 218)


def render_grid(groups: list[CaptionGroup], title: str = "", cell: int = 0,
                text_width: int = 360) -> Image.Image:
    """Draw `groups` as rows: k images then the caption (wrapped), guidance, id and seed.

    Args:
        groups: Caption groups with (k, 3, S, S) uint8 images (k may differ between groups).
        title: A heading line (e.g. model, scheduler, steps).
        cell: Displayed image side in pixels (0: the images' size, at least 128; small images
            are enlarged with nearest-neighbour so pixels stay honest).
        text_width: Width of the text column in pixels.
    """
    assert groups, "nothing to draw"
    side = int(groups[0].images_kchw.shape[-1])
    cell = cell or max(side, 128)
    pad, gap = 16, 6
    font = ImageFont.load_default(size=15)
    small = ImageFont.load_default(size=12)
    heading = ImageFont.load_default(size=18)
    max_k = max(g.num_images for g in groups)
    row_h = cell + gap
    title_h = 34 if title else 0
    width = pad + max_k * (cell + gap) + pad + text_width + pad
    height = pad + title_h + len(groups) * row_h + pad
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, pad), title, fill=_TEXT, font=heading)
    # Characters per wrapped line, from the font's average glyph width.
    chars = max(12, int(text_width / max(1.0, font.getlength("abcdefghij klmnopq") / 18)))
    for row, group in enumerate(groups):
        top = pad + title_h + row * row_h
        for j in range(group.num_images):
            array = group.images_kchw[j].permute(1, 2, 0).contiguous().numpy()
            tile = Image.fromarray(array)
            if tile.size != (cell, cell):
                smaller = tile.size[0] < cell
                tile = tile.resize((cell, cell), Image.NEAREST if smaller else Image.LANCZOS)
            canvas.paste(tile, (pad + j * (cell + gap), top))
        left = pad + max_k * (cell + gap) + pad
        lines = textwrap.wrap(group.caption, width=chars)
        max_lines = max(1, (cell - 24) // 19)
        if len(lines) > max_lines:
            lines = lines[:max_lines]
            lines[-1] = lines[-1].rstrip(" .,") + " …"
        y = top + 2
        for line in lines:
            draw.text((left, y), line, fill=_TEXT, font=font)
            y += 19
        info = (f"guidance {group.guidance_scale:g}  ·  caption {group.caption_id}  ·  "
                f"epoch {group.epoch}  ·  seed {group.seed}")
        draw.text((left, top + cell - 16), info, fill=_MUTED, font=small)
        if row + 1 < len(groups):
            draw.line((pad, top + row_h - gap // 2 - 1, width - pad, top + row_h - gap // 2 - 1),
                      fill=_RULE)
    return canvas
