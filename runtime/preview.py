"""What the model sees, as a picture a person can check: one view, or a labelled contact sheet."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LABEL_HEIGHT = 16  # pixels above each tile for its label (Pillow's default font is ~11 px tall)
GAP = 4  # pixels between tiles, so slice edges are not mistaken for anatomy
BACKGROUND = (48, 48, 48)  # not black, so a tile's black padding shows where the tile ends


def contact_sheet(views: np.ndarray, labels: Sequence[str | None]) -> np.ndarray:
    """(N, S, S, 3) uint8 views -> one (rows*(S+16+4), cols*(S+4), 3) uint8 grid, each tile
    under its label (a missing label becomes its 1-based position, e.g. '3')."""
    n, size = views.shape[0], views.shape[1]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    tile_w, tile_h = size + GAP, size + LABEL_HEIGHT + GAP
    sheet = Image.new("RGB", (cols * tile_w, rows * tile_h), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i in range(n):
        x, y = (i % cols) * tile_w, (i // cols) * tile_h
        sheet.paste(Image.fromarray(views[i]), (x, y + LABEL_HEIGHT))
        label = labels[i] if i < len(labels) and labels[i] else str(i + 1)
        draw.text((x + 2, y + 2), label, fill=(255, 255, 255), font=font)
    return np.asarray(sheet)
