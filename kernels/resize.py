"""Antialiased bilinear resize of uint8 pictures, bit-exact with Pillow's `Image.resize(BILINEAR)`.

Why Pillow's arithmetic and not any bilinear: transformers' Gemma3ImageProcessor resizes with
Pillow, so MedGemma was fed Pillow's pixels. Pillow downscales with a triangle filter widened by the
scale factor (antialiasing, unlike OpenCV/torch `bilinear`), in two separable passes with 22-bit
fixed-point weights and a uint8 intermediate, so even the order of the passes shows in the pixels.
Any other bilinear lands a few grey levels away.

`resize_bilinear` is the kernel: Pillow's own C loop, so it matches transformers by construction on
whatever Pillow is installed; a gray picture goes through as one plane, a third of the work of RGB
and the same pixels per channel. `resize_bilinear_reference` re-derives the numbers in plain numpy;
the tests hold the two equal byte for byte, so a Pillow release that changes the arithmetic or the
pass order is noticed rather than silently shifting every image.
"""

from __future__ import annotations

import math

import numpy as np
import PIL
from PIL import Image

from medgemma_edge.kernels import bands

PRECISION_BITS = 22  # Pillow's fixed-point weight precision for 8-bit images (32 - 8 - 2)
_PILLOW_MAJOR = int(PIL.__version__.split(".")[0])


def resize_bilinear(pixels: np.ndarray, height: int, width: int, threads: int = 1) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8 -> (height, width[, 3]) uint8, exactly as Pillow resizes it.

    threads > 1 splits a large resize into bands run in parallel (Pillow releases the GIL while
    it resamples): see `_resize_banded`. The bytes are the same either way.
    """
    _check_u8(pixels)
    if pixels.shape[:2] == (height, width):
        return np.array(pixels, copy=True)
    if threads > 1 and pixels.shape[0] * pixels.shape[1] >= bands.MIN_ELEMENTS:
        return _resize_banded(pixels, height, width, threads)
    return _pillow(pixels, height, width)


def _pillow(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    image = Image.fromarray(np.ascontiguousarray(pixels))
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))


def _resize_banded(pixels: np.ndarray, height: int, width: int, threads: int) -> np.ndarray:
    """Pillow's two passes, each split into bands on threads, with Pillow doing every band.

    Pillow resizes in two separable passes with a uint8 image in between. The horizontal pass
    treats each row alone and the vertical pass each column alone, with weights that depend only
    on the sizes. So the horizontal pass of a band of rows is exactly those rows of the whole
    pass, and the same holds for columns: rows in bands, then columns in bands (or the other way
    round, in the order Pillow itself would take) gives Pillow's bytes.
    """
    in_h, in_w = pixels.shape[:2]
    steps = [("h", width), ("v", height)]
    if vertical_pass_first(in_h, in_w, height, width):
        steps.reverse()
    out = pixels
    for axis, size in steps:
        if (out.shape[1] if axis == "h" else out.shape[0]) == size:
            continue  # Pillow skips a pass whose size does not change
        out = _pass_in_bands(out, axis, size, threads)
    return out


def _pass_in_bands(pixels: np.ndarray, axis: str, size: int, threads: int) -> np.ndarray:
    h, w = pixels.shape[:2]
    out = np.empty(((h, size) if axis == "h" else (size, w)) + pixels.shape[2:], np.uint8)

    def band(a, b):
        if axis == "h":  # rows a..b, resized in width only
            out[a:b] = _pillow(pixels[a:b], b - a, size)
        else:  # columns a..b, resized in height only
            out[:, a:b] = _pillow(pixels[:, a:b], size, b - a)

    bands.run_bands(band, h if axis == "h" else w, threads)
    return out


def resize_bilinear_reference(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Plain numpy re-statement of Pillow's 8-bit bilinear resample (the kernel's reference)."""
    _check_u8(pixels)
    planes = pixels[..., None] if pixels.ndim == 2 else pixels
    out = planes.astype(np.int64)
    # Pillow skips a pass whose size does not change. The order of the passes matters, because
    # the intermediate is rounded to uint8.
    axes = (0, 1) if vertical_pass_first(*pixels.shape[:2], height, width) else (1, 0)
    for axis in axes:
        size = (height, width)[axis]
        if out.shape[axis] != size:
            out = _resample_axis(out, axis=axis, out_size=size)
    out = out.astype(np.uint8)
    return out[..., 0] if pixels.ndim == 2 else out


def vertical_pass_first(in_h: int, in_w: int, out_h: int, out_w: int) -> bool:
    """Whether Pillow runs the vertical pass before the horizontal one for this resize.

    Pillow 13 (python-pillow/Pillow#9549, "if height is scaled down significantly more than
    width, resize vertically first") goes vertical first when it drops more than twice as many rows
    as columns; older Pillow always went horizontal first. The threshold was measured against
    Pillow 13.0.0 on ~4500 random sizes, not read from its source; the tests keep checking it.
    """
    if _PILLOW_MAJOR < 13:
        return False
    return out_h < in_h and (in_h - out_h) > 2 * (in_w - out_w)


def bilinear_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output index: first input index (out_size,) and fixed-point weights (out_size, taps).

    Follows Pillow's `precompute_coeffs` operation for operation in float64 (the order of the
    additions decides the last bit of a weight, and so sometimes a rounded pixel).
    """
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)  # widen the triangle only when shrinking: that is the antialias
    support = 1.0 * filterscale  # bilinear's support is 1
    taps = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    inv = 1.0 / filterscale
    # C casts with (int), which truncates toward zero.
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    last = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64)
    count = last - first  # (out_size,)
    k = np.arange(taps)
    x = ((first[:, None] + k[None, :]).astype(np.float64) - center[:, None] + 0.5) * inv
    w = np.where(np.abs(x) < 1.0, 1.0 - np.abs(x), 0.0)
    w[k[None, :] >= count[:, None]] = 0.0  # (out_size, taps)
    total = np.zeros(out_size)
    for j in range(taps):  # sequential, as C sums: numpy's pairwise sum could differ in the last bit
        total += w[:, j]
    w = np.divide(w, total[:, None], out=w, where=total[:, None] != 0.0)
    one = float(1 << PRECISION_BITS)
    fixed = np.where(w < 0, np.trunc(-0.5 + w * one), np.trunc(0.5 + w * one)).astype(np.int64)
    return first, fixed


def _resample_axis(planes: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    in_size = planes.shape[axis]
    first, fixed = bilinear_weights(in_size, out_size)
    src = np.moveaxis(planes, axis, 0)  # (in_size, other, C)
    acc = np.full((out_size,) + src.shape[1:], 1 << (PRECISION_BITS - 1), dtype=np.int64)
    for j in range(fixed.shape[1]):
        idx = np.minimum(first + j, in_size - 1)  # taps past the edge carry weight 0
        acc += src[idx] * fixed[:, j].reshape((-1,) + (1,) * (src.ndim - 1))
    out = np.clip(acc >> PRECISION_BITS, 0, 255)
    return np.moveaxis(out, 0, axis)


def _check_u8(pixels: np.ndarray) -> None:
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (
        pixels.ndim == 3 and pixels.shape[2] != 3
    ):
        raise ValueError(f"expected (H, W) or (H, W, 3) uint8, got {pixels.shape} {pixels.dtype}")
