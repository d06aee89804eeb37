"""High-bit-depth pixels (16-bit, 32-bit int, float) -> uint8 by the picture's own full range.

min -> 0, max -> 255, linear in between, rounded half up:
    out = floor((v - min) * (255 / (max - min)) + 0.5)
Only finite values define min and max; NaN and -inf become 0, +inf 255. A constant picture
(max == min) becomes all 0: there is no contrast to keep.

Why not transformers' way: Pillow's convert("RGB") clips every value above 255, so a 12-bit X-ray
(0..4095) comes out almost all white. Stretching by the actual range keeps the whole image.

`full_range_u8` is the kernel: for 8/16-bit integers the formula is evaluated once per possible
code into a lookup table and the picture is one gather; int32 pictures whose range spans fewer
than 65536 codes are offset into the same table. `full_range_u8_reference` evaluates the formula
on every pixel; both compute the same float64 expression, so they agree bit for bit.
"""

from __future__ import annotations

import numpy as np

from medgemma_edge.kernels.codes import every_code

_TABLE_CODES = 1 << 16  # a table this size costs less than one pass over an X-ray


def full_range_u8(values: np.ndarray) -> np.ndarray:
    """Any real-valued array (integer or float) -> uint8 of the same shape, stretched min..max."""
    v = np.asarray(values)
    if v.dtype.kind not in "uif":
        raise ValueError(f"expected integer or float pixels, got {v.dtype}")
    if not v.dtype.isnative:
        v = v.astype(v.dtype.newbyteorder("="))
    if v.size == 0:
        return np.zeros(v.shape, np.uint8)
    if v.dtype.kind in "ui" and v.dtype.itemsize <= 2:
        return _by_code_table(v)
    lo, hi = _finite_range(v)
    if v.dtype.kind in "ui" and hi - lo < _TABLE_CODES:
        codes = np.arange(lo, hi + 1, dtype=np.int64)
        table = _stretch(codes.astype(np.float64), lo, hi)
        offset = (v - v.dtype.type(lo)).astype(np.uint16)  # in range: lo <= v <= hi
        return np.take(table, offset)
    return _stretch_floats(v, lo, hi)


def full_range_u8_reference(values: np.ndarray) -> np.ndarray:
    """Plain per-pixel version of `full_range_u8`."""
    v = np.asarray(values).astype(np.float64)
    finite = np.isfinite(v)
    if not finite.any():
        return np.zeros(v.shape, np.uint8)
    lo, hi = v[finite].min(), v[finite].max()
    if hi == lo:
        return np.zeros(v.shape, np.uint8)
    out = np.floor((v - lo) * (255.0 / (hi - lo)) + 0.5)
    out = np.where(np.isnan(v), 0.0, np.clip(out, 0.0, 255.0))  # +-inf land on 255 / 0
    return out.astype(np.uint8)


def _by_code_table(v: np.ndarray) -> np.ndarray:
    unsigned = np.dtype(f"u{v.dtype.itemsize}")
    lo, hi = int(v.min()), int(v.max())
    # Every bit pattern of the dtype, in index order, read back as the dtype's values.
    codes = every_code(v.dtype)
    table = _stretch(codes.astype(np.float64), lo, hi)
    return np.take(table, v.view(unsigned))


def _finite_range(v: np.ndarray) -> tuple:
    lo, hi = v.min(), v.max()
    if v.dtype.kind == "f" and not (np.isfinite(lo) and np.isfinite(hi)):
        finite = v[np.isfinite(v)]
        if finite.size == 0:
            return 0.0, 0.0
        lo, hi = finite.min(), finite.max()
    if v.dtype.kind in "ui":
        return int(lo), int(hi)
    return float(lo), float(hi)


def _stretch(x: np.ndarray, lo, hi) -> np.ndarray:
    """float64 values -> uint8 by the documented formula (x may be a table of codes)."""
    if hi == lo:
        return np.zeros(x.shape, np.uint8)
    out = np.floor((x - float(lo)) * (255.0 / (float(hi) - float(lo))) + 0.5)
    return np.clip(out, 0.0, 255.0).astype(np.uint8)


def _stretch_floats(v: np.ndarray, lo, hi) -> np.ndarray:
    x = v.astype(np.float64)
    if v.dtype.kind == "f":
        x[np.isnan(x)] = lo  # NaN -> 0; the clip in _stretch sends +inf to 255, -inf to 0
    return _stretch(x, lo, hi)
