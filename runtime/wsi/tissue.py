"""Which patches of a slide hold tissue, and which of those the model sees. Pure numpy, no I/O.

The rules of ez-wsi-dicomweb 6.1.5's patch_generator, as Google's pathology notebook runs them:
- the patch grid: 896×896 patches with stride 896 at the patch level, over whole strides only
  (a remainder narrower than a stride at the right or bottom edge is dropped);
- the mask: the low-resolution level converted to grey as OpenCV's COLOR_RGB2GRAY does
  (0.299 R + 0.587 G + 0.114 B, in its fixed-point form, rounded to uint8), cropped to the area
  the whole strides cover, and averaged over each patch's area: one mean grey value per patch
  (each low-resolution pixel counts for the patch its centre falls in, an exact area average when
  the level's downsample ratio divides the stride, as in power-of-two and power-of-four pyramids);
- a patch is tissue when MIN_GREY <= mean grey <= MAX_GREY: ez-wsi's min_luminance 1/255 and
  max_luminance 0.8 (0.8 × 255 = 204) — white glass is brighter, pure black is no scan;
- at most MAX_PATCHES tissue patches: the notebook's random.sample, with a fixed seed (SEED) so an
  answer can be repeated, shown in reading order (row by row, left to right).
"""

from __future__ import annotations

import random

import numpy as np

PATCH = 896  # side and stride of a patch at the patch level, in its pixels (MedGemma's input size)
MIN_GREY, MAX_GREY = 1, 204  # ez-wsi min_luminance 1/255 and max_luminance 0.8, on 0..255 grey
MAX_PATCHES = 125  # the notebook's sample size
SEED = 0  # the notebook samples without a seed; ours is fixed and reported


def grey(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) uint8 grey, bit for bit OpenCV's COLOR_RGB2GRAY (its 14-bit
    fixed-point coefficients, rounded)."""
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((r * 4899 + g * 9617 + b * 1868 + (1 << 13)) >> 14).astype(np.uint8)


def grid_shape(level_width: int, level_height: int) -> tuple[int, int]:
    """(rows, cols) of whole 896-pixel strides at the patch level."""
    return level_height // PATCH, level_width // PATCH


class PatchMeans:
    """Mean grey per patch, accumulated strip by strip over the mask level, so the level is never
    held whole. `ratio`: patch-level pixels per mask-level pixel (mask downsample / patch downsample)."""

    def __init__(self, rows: int, cols: int, ratio: float):
        self.rows, self.cols, self.ratio = rows, cols, ratio
        self.sums = np.zeros((rows, cols), np.float64)
        self.counts = np.zeros((rows, cols), np.int64)

    def _index(self, start: int, count: int, limit: int) -> np.ndarray:
        centres = (np.arange(start, start + count) + 0.5) * self.ratio  # in patch-level pixels
        index = np.floor(centres / PATCH).astype(np.int64)
        return np.where(index < limit, index, -1)  # -1: beyond the whole strides, cropped

    def add(self, y0: int, rgb: np.ndarray) -> None:
        """Count the (h, w, 3) strip of the mask level whose first row is row y0."""
        h, w = rgb.shape[:2]
        rows, cols = self._index(y0, h, self.rows), self._index(0, w, self.cols)
        keep_r, keep_c = rows >= 0, cols >= 0
        if not keep_r.any() or not keep_c.any():
            return
        values = grey(rgb[keep_r][:, keep_c]).astype(np.float64)  # (h', w')
        cell = rows[keep_r][:, None] * self.cols + cols[keep_c][None, :]  # (h', w') flat patch index
        size = self.rows * self.cols
        self.sums += np.bincount(cell.ravel(), values.ravel(), size).reshape(self.rows, self.cols)
        self.counts += np.bincount(cell.ravel(), None, size).reshape(self.rows, self.cols)

    def means(self) -> np.ndarray:
        """(rows, cols) mean grey; NaN for a patch no mask pixel fell in (never tissue)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.counts > 0, self.sums / np.maximum(self.counts, 1), np.nan)


def tissue_patches(means: np.ndarray) -> list[tuple[int, int]]:
    """(row, col) of every tissue patch, in reading order."""
    ok = (means >= MIN_GREY) & (means <= MAX_GREY)  # NaN compares False
    return [(int(r), int(c)) for r, c in zip(*np.nonzero(ok))]  # np.nonzero is row-major


def sample_patches(tissue: list[tuple[int, int]], count: int, seed: int = SEED) -> list[tuple[int, int]]:
    """`count` of the tissue patches (all when there are no more), in reading order."""
    if len(tissue) <= count:
        return list(tissue)
    return sorted(random.Random(seed).sample(tissue, count))
