"""`preview` of a slide: a thumbnail with its patch grid, so a person can check what the model sees.

Tissue patches are outlined thin; the sampled ones (those in the prompt) thick and numbered in
prompt order; the area beyond the whole strides (dropped) is shaded.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from medgemma_edge.runtime.wsi import SlidePlan
from medgemma_edge.runtime.wsi.slide import open_slide, read_level_strips
from medgemma_edge.runtime.wsi.tissue import PATCH

THUMB_SIDE = 2048  # longest side of the sheet, pixels
TISSUE = (40, 160, 60)  # outline of a tissue patch not sampled
SAMPLED = (230, 40, 40)  # outline and number of a sampled patch
DROPPED = (0, 0, 0, 72)  # shade over the edge remainder left out of the grid


def slide_sheet(plan: SlidePlan) -> np.ndarray:
    """(H, W, 3) uint8: the slide's mask level scaled to THUMB_SIDE at most, the grid drawn on it."""
    with open_slide(plan.path) as slide:
        width, height = slide.level_dimensions[plan.mask_level]
        scale = min(1.0, THUMB_SIDE / max(width, height))  # thumbnail pixels per mask-level pixel
        thumb = Image.new("RGB", (max(1, round(width * scale)), max(1, round(height * scale))), (255, 255, 255))
        for y0, strip in read_level_strips(slide, plan.mask_level):  # strip by strip: never the level whole
            h = max(1, round((y0 + strip.shape[0]) * scale) - round(y0 * scale))
            thumb.paste(Image.fromarray(strip).resize((thumb.width, h), Image.Resampling.BOX), (0, round(y0 * scale)))
        per_level0 = scale / slide.level_downsamples[plan.mask_level]  # thumbnail pixels per level-0 pixel
    step = PATCH * plan.level.downsample * per_level0  # one stride on the thumbnail
    rows, cols = plan.grid
    overlay = Image.new("RGBA", thumb.size, (0, 0, 0, 0))
    shade = ImageDraw.Draw(overlay)
    shade.rectangle([cols * step, 0, thumb.width, thumb.height], fill=DROPPED)
    shade.rectangle([0, rows * step, cols * step, thumb.height], fill=DROPPED)
    sheet = Image.alpha_composite(thumb.convert("RGBA"), overlay).convert("RGB")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for r, c in plan.tissue:
        draw.rectangle(_box(r, c, step), outline=TISSUE, width=1)
    for number, (r, c) in enumerate(plan.sampled, start=1):
        box = _box(r, c, step)
        draw.rectangle(box, outline=SAMPLED, width=max(2, round(step / 24)))
        if step >= 14:  # a number fits
            draw.text((box[0] + 3, box[1] + 2), str(number), fill=SAMPLED, font=font)
    return np.asarray(sheet)


def _box(row: int, col: int, step: float) -> list[float]:
    return [col * step, row * step, (col + 1) * step - 1, (row + 1) * step - 1]
