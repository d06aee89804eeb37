"""Whole-slide pathology images (WSI) as a visual input, the way Google's notebook
`high_dimensional_pathology_hugging_face.ipynb` (Google-Health/medgemma, commit ca633909) feeds
MedGemma a slide: tissue patches of 896×896 at 10X, at most 125, one image each.

    slide_path   is this source a slide? (by content; slide.py)
    plan_slide   level, tissue grid and sampled patches of a slide, without reading a patch
    load_slide   the sampled patches as `Picture`s, in reading order

The slide is opened through OpenSlide and read region by region (the mask level in strips of a
few MB, then one patch at a time), never whole. Level choice: slide.py; tissue rules and
sampling: tissue.py; the preview sheet: sheet.py. docs/wsi.md says all of it for users.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.files import shown
from medgemma_edge.runtime.picture import DEFAULT_MAX_SLICES, Picture
from medgemma_edge.runtime.wsi.slide import (HEAD, TIFF_MAGIC, Level, choose_level, choose_mask_level, is_slide_head,
                                             open_slide, read_level_strips, read_rgb, slide_path)
from medgemma_edge.runtime.wsi.tissue import (MAX_PATCHES, PATCH, SEED, PatchMeans, grid_shape, sample_patches,
                                              tissue_patches)

__all__ = ["SlidePlan", "plan_slide", "load_slide", "load_slide_bytes", "slide_path", "patch_cap", "PATCH", "SEED", "MAX_PATCHES"]


@dataclass
class SlidePlan:
    path: str  # the file OpenSlide opens (for a DICOM WSI folder, one of its instances)
    level: Level  # where patches are cut
    mask_level: int  # where tissue is found
    means: np.ndarray = field(repr=False)  # (rows, cols) mean grey per candidate patch
    tissue: list[tuple[int, int]]  # (row, col) of tissue patches, reading order
    sampled: list[tuple[int, int]]  # the ones the model sees, reading order
    seed: int = SEED

    @property
    def grid(self) -> tuple[int, int]:
        return self.means.shape

    def origin(self, row: int, col: int) -> tuple[int, int]:
        """Level-0 (x, y) of a patch's top-left corner: where read_region is asked."""
        step = PATCH * self.level.downsample
        return round(col * step), round(row * step)

    def describe(self) -> str:
        rows, cols = self.grid
        return (f"{shown(self.path)}: {self.level.describe()}; {len(self.sampled)} of {len(self.tissue)} tissue "
                f"patches of {rows}x{cols} (seed {self.seed})")


def patch_cap(max_slices: int) -> int:
    """How many patches a slide gives: the notebook's 125, or max_slices when a caller set it lower
    (the CT default, DEFAULT_MAX_SLICES, is the CT recipe's and does not cap a slide)."""
    return MAX_PATCHES if max_slices == DEFAULT_MAX_SLICES else min(MAX_PATCHES, max_slices)


def plan_slide(src, *, max_slices: int = DEFAULT_MAX_SLICES, level: int | None = None) -> SlidePlan:
    """Level, tissue grid and sampled patches of the slide `src` (a file, or a DICOM WSI folder)."""
    path = slide_path(src)
    if path is None:
        raise InputError(f"{shown(src)}: not a whole-slide image OpenSlide reads")
    name = shown(path)
    with open_slide(path) as slide:
        chosen = choose_level(slide, level, name)
        rows, cols = grid_shape(*slide.level_dimensions[chosen.index])
        if rows == 0 or cols == 0:
            w, h = slide.level_dimensions[chosen.index]
            raise InputError(f"{name}: level {chosen.index} is {w}x{h} pixels, smaller than one {PATCH}-pixel "
                             "patch — pass a finer --level")
        mask = choose_mask_level(slide, chosen)
        means = PatchMeans(rows, cols, slide.level_downsamples[mask] / chosen.downsample)
        for y0, strip in read_level_strips(slide, mask):
            means.add(y0, strip)
    grey = means.means()
    tissue = tissue_patches(grey)
    if not tissue:
        raise InputError(f"{name}: no tissue found at {chosen.describe()} (every patch is near white or black) — "
                         "check the slide, or pass another --level")
    return SlidePlan(path, chosen, mask, grey, tissue, sample_patches(tissue, patch_cap(max_slices)))


def read_patches(plan: SlidePlan) -> list[Picture]:
    """The sampled patches of `plan`, one read each, as unlabelled pictures in reading order."""
    pictures = []
    with open_slide(plan.path) as slide:
        for row, col in plan.sampled:
            x, y = plan.origin(row, col)
            pictures.append(Picture(read_rgb(slide, x, y, plan.level.index, PATCH, PATCH)))
    return pictures


def load_slide(src, *, max_slices: int = DEFAULT_MAX_SLICES, level: int | None = None) -> list[Picture]:
    """The sampled tissue patches of the slide `src` as pictures (no labels: the notebook gives none)."""
    return read_patches(plan_slide(src, max_slices=max_slices, level=level))


def load_slide_bytes(data: bytes, *, max_slices: int = DEFAULT_MAX_SLICES) -> list[Picture] | None:
    """An uploaded slide (TIFF-based bytes: a server upload) as load_slide gives it, through a private
    temporary file (OpenSlide reads files only), deleted at once; None when the bytes are no slide
    (an ordinary TIFF picture, decoded as a picture)."""
    import os
    import tempfile

    if not is_slide_head(bytes(data[:HEAD])):
        return None
    folder = tempfile.mkdtemp(prefix="medgemma-edge-slide-")  # mode 0700: the upload holds patient tissue
    path = os.path.join(folder, "upload.dcm" if bytes(data[:4]) not in TIFF_MAGIC else "upload.tiff")
    try:
        with open(path, "wb") as f:
            f.write(data)
        if slide_path(path) is None:
            return None
        return load_slide(path, max_slices=max_slices)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        os.rmdir(folder)
