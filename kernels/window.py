"""CT windowing: stored values → Hounsfield units → one uint8 channel per window.

MedGemma 1.5 sees a CT slice as three windows packed into R, G and B. Per window (lo, hi) in
HU: `clip(hu, lo, hi)`, then `(hu − lo) / (hi − lo) × 255` in float32, rounded half to even. That
is the arithmetic of Google's CT notebook (`high_dimensional_ct_hugging_face.ipynb`: clip on the
float64 HU, cast to float32, subtract, divide, multiply, `np.round`), so `window_reference`
follows it step by step; rounding ties land where the model's training data put them.

`apply_windows` gives the same bytes faster: a CT slice holds 8- or 16-bit integers, so every
possible stored value can be windowed once, into a table, and the volume becomes one gather.
Arrays in, arrays out; no files, no DICOM.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from medgemma_edge.kernels.codes import every_code

Window = tuple[float, float]  # (lo, hi) in Hounsfield units, lo < hi

# Stored dtypes small enough to enumerate: 256 or 65536 table rows.
_TABLE_DTYPES = (np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.uint16), np.dtype(np.int16))


def window_reference(hu: np.ndarray, windows) -> np.ndarray:
    """(...) HU (any real dtype) → (..., len(windows)) uint8. The plain float recipe."""
    channels = []
    for lo, hi in windows:
        lo, hi = float(lo), float(hi)
        x = np.clip(hu, lo, hi).astype(np.float32)
        # Python floats are "weak" scalars, so each step stays in float32 like the notebook's.
        x -= lo
        x /= hi - lo
        x *= 255.0
        channels.append(np.round(x).astype(np.uint8))
    return np.stack(channels, axis=-1)


def stored_to_hu(stored: np.ndarray, slope: float = 1.0, intercept: float = 0.0) -> np.ndarray:
    """Modality rescale in float64, the order pydicom's `apply_rescale` uses (×slope, then +)."""
    hu = stored.astype(np.float64) * float(slope)
    hu += float(intercept)
    return hu


@lru_cache(maxsize=32)
def _table(windows: tuple[Window, ...], slope: float, intercept: float, dtype_str: str) -> np.ndarray:
    dtype = np.dtype(dtype_str)
    # Row k holds the stored value whose bits read as k unsigned, so a signed volume can index
    # the table through a free `.view(unsigned)` instead of an offset pass.
    values = every_code(dtype)
    table = window_reference(stored_to_hu(values, slope, intercept), windows)  # (rows, C)
    table.setflags(write=False)
    return table


def window_table(windows, slope: float = 1.0, intercept: float = 0.0,
                 dtype=np.int16) -> np.ndarray:
    """(2**bits, C) uint8: row `v.view(uint)` is `window_reference` of stored value v."""
    return _cached(windows, slope, intercept, dtype)


def _cached(windows, slope, intercept, dtype) -> np.ndarray:
    dtype = np.dtype(dtype).newbyteorder("=")
    if dtype not in _TABLE_DTYPES:
        raise ValueError(f"window tables exist for 8- and 16-bit integers, not {dtype}")
    key = tuple((float(lo), float(hi)) for lo, hi in windows)
    return _table(key, float(slope), float(intercept), dtype.str)


def apply_windows(stored: np.ndarray, windows, slope: float = 1.0,
                  intercept: float = 0.0) -> np.ndarray:
    """(...) stored CT values → (..., C) uint8, identical to `window_reference(hu)`.

    8/16-bit integers go through a cached table; anything else (32-bit, float) through the
    reference, which is where such rare data would end up anyway.
    """
    stored = np.asarray(stored)
    native = stored.dtype.newbyteorder("=")
    if native not in _TABLE_DTYPES:
        return window_reference(stored_to_hu(stored, slope, intercept), windows)
    if stored.dtype != native:
        stored = stored.astype(native)  # big-endian files: one byte swap, then the table
    table = _cached(windows, slope, intercept, native)
    index = np.ascontiguousarray(stored).view(f"u{native.itemsize}").reshape(-1)
    # One C-byte row per pixel as an opaque item: a single gather, any channel count.
    rows = np.ascontiguousarray(table).view(f"V{table.shape[1]}").reshape(-1)
    out = np.take(rows, index).view(np.uint8)
    return out.reshape(stored.shape + (table.shape[1],))
