"""A whole-slide image through OpenSlide: telling one by its content, opening it with one-line
errors, the two levels chosen on its pyramid, and reading a region as RGB.

Levels, as Google's notebook chooses them through ez-wsi-dicomweb 6.1.5: patches are cut at 10X,
which ez-wsi defines as 1.0 µm per pixel; the tissue mask is made at 1.25X (~8 µm per pixel).
A level's µm per pixel is the slide's own (`openslide.mpp-x`) times the level's downsample, or,
when the slide reports only its scanner's objective power, 10 / (objective power / downsample).
The level taken is the one closest to the target on a log scale (0.5 and 2.0 µm/px are equally
far from 1.0; the finer wins a tie); ez-wsi accepts a level within a relative distance of 0.23
of the target, and a level further off is said in `describe`. A slide with neither property needs `--level N`.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from medgemma_edge.runtime.dicom.raw import looks_like_dicom
from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.files import read_head, shown

PATCH_MPP = 1.0  # ez-wsi's "10X"
MASK_MPP = 8.0  # ez-wsi's "1.25X", where patch_generator makes its tissue mask
TOLERANCE = 0.23  # ez-wsi's MAX_LEVEL_DIST: a level matches a pixel spacing within this relative distance
MAX_SIDE = 500_000  # pixels a side at full resolution; the largest scanners write ~200,000
MAX_LEVELS = 64
MAX_MASK_PIXELS = 1 << 28  # the mask level is read whole (in strips): a slide without a low-resolution level is refused
CACHE_BYTES = 64 << 20  # OpenSlide's tile cache (its default is 1 GiB); each patch is read once anyway
STRIP_PIXELS = 1 << 22  # pixels per read when a level is read whole: ~16 MB of RGBA at a time

WSI_SOP_CLASS = b"1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic and BigTIFF, both byte orders
# Formats OpenSlide reads whose files do not start as TIFF (MIRAX index, Hamamatsu VMS, ...).
_SLIDE_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide"}
HEAD = 4096  # enough for a DICOM file's meta header, where the SOP class sits
_FOLDER_PROBE = 16  # files of a folder looked at for a DICOM WSI instance
_ERRORS = (OSError, ValueError)  # OpenSlide's errors are added in `_openslide`


def _openslide():
    import openslide  # imported when a file looks like a slide: a PNG never pays for it

    return openslide, _ERRORS + (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError)


def _is_wsi_dicom(head: bytes) -> bool:
    at = head.find(WSI_SOP_CLASS)
    end = at + len(WSI_SOP_CLASS)
    return looks_like_dicom(head) and at >= 0 and (end == len(head) or head[end:end + 1] not in b"0123456789.")


def is_slide_head(head: bytes) -> bool:
    """Could bytes starting with `head` be a slide: TIFF-based, or a DICOM whole-slide instance?"""
    return head[:4] in TIFF_MAGIC or (looks_like_dicom(head) and _is_wsi_dicom(head))


def slide_path(src) -> str | None:
    """The file OpenSlide should open for `src`, or None when `src` is no slide: a TIFF-based or
    vendor slide (OpenSlide recognises it; a single-level generic TIFF stays a picture), a DICOM
    file of a whole-slide SOP class, or a folder holding one. Only a file whose head looks like
    TIFF or DICOM WSI, or whose name is a vendor slide's, is shown to OpenSlide."""
    if not isinstance(src, (str, os.PathLike)):
        return None
    path = Path(src)
    if path.is_dir():
        return _dicom_wsi_in(path)
    head = read_head(path, HEAD)  # refuses FIFOs, devices, missing files in one line
    if looks_like_dicom(head):
        return str(path) if _is_wsi_dicom(head) else None
    if not (head[:4] in TIFF_MAGIC or path.suffix.lower() in _SLIDE_SUFFIXES):
        return None
    openslide, errors = _openslide()
    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
    except errors:
        return None
    if vendor == "generic-tiff":
        try:
            with contextlib.closing(openslide.OpenSlide(str(path))) as slide:
                if slide.level_count < 2:
                    return None
        except errors:
            pass  # recognised but damaged: the slide loader says so in one line
    if vendor is None and head[:4] in TIFF_MAGIC and path.suffix.lower() in _SLIDE_SUFFIXES:
        return str(path)  # a slide's name on a TIFF OpenSlide cannot place (cut short?): its error, not Pillow's
    return str(path) if vendor is not None else None


def _dicom_wsi_in(folder: Path) -> str | None:
    try:
        names = sorted(e.name for e in os.scandir(folder) if e.is_file(follow_symlinks=False))
    except OSError:
        return None
    for name in names[:_FOLDER_PROBE]:
        try:
            if _is_wsi_dicom(read_head(folder / name, HEAD)):
                return str(folder / name)
        except InputError:
            continue
    return None


@contextlib.contextmanager
def open_slide(path: str):
    """An OpenSlide handle, checked: a bounded pyramid; any OpenSlide or I/O failure inside the
    block becomes one line."""
    openslide, errors = _openslide()
    name = shown(path)
    try:
        slide = openslide.OpenSlide(path)
        slide.set_cache(openslide.OpenSlideCache(CACHE_BYTES))
    except errors as err:
        raise InputError(f"{name}: cannot open the slide ({_reason(err)}) — check the file is a whole "
                         "slide image OpenSlide reads (SVS, NDPI, MRXS, pyramidal TIFF, DICOM WSI) and is complete") from None
    try:
        _check_pyramid(slide, name)
        yield slide
    except errors as err:
        raise InputError(f"{name}: cannot read the slide ({_reason(err)}) — the file may be truncated or "
                         "damaged; export it again") from None
    finally:
        with contextlib.suppress(*errors):
            slide.close()


def _reason(err: Exception) -> str:
    text = str(err).splitlines()[0] if str(err).strip() else type(err).__name__
    return shown(text)[:160]


def _check_pyramid(slide, name: str) -> None:
    if not 1 <= slide.level_count <= MAX_LEVELS:
        raise InputError(f"{name}: {slide.level_count} pyramid levels — a slide has 1 to {MAX_LEVELS}")
    width, height = slide.dimensions
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise InputError(f"{name}: {width}x{height} pixels is outside 1..{MAX_SIDE:,} a side — "
                         "the file is damaged or not a slide")
    for w, h in slide.level_dimensions:
        if not (0 < w <= width and 0 < h <= height):
            raise InputError(f"{name}: a pyramid level of {w}x{h} pixels does not fit the slide's "
                             f"{width}x{height} — the file is damaged")


@dataclass(frozen=True)
class Level:
    index: int
    downsample: float  # level-0 pixels per pixel of this level
    mpp: float | None  # µm per pixel here; None when the slide says neither mpp nor objective power
    source: str  # where mpp came from: "openslide.mpp-x", "openslide.objective-power" or "--level"

    @property
    def magnification(self) -> float | None:
        return PATCH_MPP * 10 / self.mpp if self.mpp else None  # ez-wsi: 10X is 1.0 µm/px

    def describe(self) -> str:
        if self.mpp is None:
            return f"level {self.index} (downsample {self.downsample:g}, size unknown: chosen by --level)"
        off = "" if abs(self.mpp / PATCH_MPP - 1) <= TOLERANCE else \
            f"; no level is within a relative {TOLERANCE:g} of {PATCH_MPP:g} µm/px, the notebook's 10X"
        return (f"level {self.index} at {self.mpp:.3g} µm/px, {self.magnification:.3g}X "
                f"(from {self.source}){off}")


def base_mpp(slide) -> tuple[float, str] | None:
    """(µm per pixel at full resolution, the property it came from), or None."""
    for key in ("openslide.mpp-x", "openslide.objective-power"):
        try:
            value = float(slide.properties.get(key, "nan"))
        except ValueError:
            continue
        if math.isfinite(value) and value > 0:
            return (value, key) if key.endswith("mpp-x") else (PATCH_MPP * 10 / value, key)
    return None


def choose_level(slide, level: int | None, name: str) -> Level:
    """The level patches are cut from: `level` when given, else the one closest to 1.0 µm/px."""
    base = base_mpp(slide)
    downs = slide.level_downsamples
    if level is not None:
        if not 0 <= level < slide.level_count:
            raise InputError(f"{name}: --level {level} — this slide has levels 0 to {slide.level_count - 1}")
        mpp = base[0] * downs[level] if base else None
        return Level(level, downs[level], mpp, base[1] if base else "--level")
    if base is None:
        raise InputError(f"{name}: the slide reports neither microns per pixel nor objective power — pass "
                         f"--level N (0 is full resolution, {slide.level_count - 1} the coarsest)")
    index = min(range(slide.level_count), key=lambda i: abs(math.log(base[0] * downs[i] / PATCH_MPP)))
    return Level(index, downs[index], base[0] * downs[index], base[1])


def choose_mask_level(slide, patch: Level) -> int:
    """The level the tissue mask is made on: closest to 8 µm/px (or 8× the patch level's
    downsample when µm are unknown) among those not finer than the patch level."""
    downs = slide.level_downsamples
    target = MASK_MPP / patch.mpp if patch.mpp else MASK_MPP / PATCH_MPP  # as a ratio to the patch level
    candidates = [i for i in range(slide.level_count) if downs[i] >= patch.downsample]
    return min(candidates, key=lambda i: (abs(math.log(downs[i] / patch.downsample / target)), i))


def read_rgb(slide, x0: int, y0: int, level: int, width: int, height: int) -> np.ndarray:
    """(height, width, 3) uint8 RGB of the region at level-0 (x0, y0), composited on white as
    OpenSlide's documentation advises: its transparent pixels are where nothing was scanned."""
    region = slide.read_region((x0, y0), level, (width, height))  # RGBA, not premultiplied
    white = Image.new("RGBA", region.size, (255, 255, 255, 255))
    white.alpha_composite(region)
    return np.asarray(white.convert("RGB"))


def read_level_strips(slide, level: int):
    """(row offset, RGB strip) pieces covering `level` top to bottom, a few MB each."""
    width, height = slide.level_dimensions[level]
    if width * height > MAX_MASK_PIXELS:
        raise InputError(f"level {level} of the slide is {width}x{height} pixels — too large to scan for "
                         "tissue; the slide needs a low-resolution level (re-export it with a pyramid)")
    rows = max(1, STRIP_PIXELS // width)
    down = slide.level_downsamples[level]
    for y in range(0, height, rows):
        yield y, read_rgb(slide, 0, round(y * down), level, width, min(rows, height - y))
