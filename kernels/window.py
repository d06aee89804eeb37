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

import sys
from functools import lru_cache

import numpy as np

from kernels.codes import every_code

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
def _tables(windows: tuple[Window, ...], slope: float, intercept: float,
            dtype_str: str) -> tuple[np.ndarray, np.ndarray | None]:
    dtype = np.dtype(dtype_str)
    # Row k holds the stored value whose bits read as k unsigned, so a signed volume can index
    # the table through a free `.view(unsigned)` instead of an offset pass.
    values = every_code(dtype)
    table = window_reference(stored_to_hu(values, slope, intercept), windows)  # (rows, C)
    table.setflags(write=False)
    packed = None
    if table.shape[1] == 3:  # the same rows as words R | G << 8 | B << 16, for _gather_rgb
        rgb0 = np.zeros((table.shape[0], 4), np.uint8)
        rgb0[:, :3] = table
        packed = rgb0.view("<u4").reshape(-1)
        packed.setflags(write=False)
    return table, packed


def window_table(windows, slope: float = 1.0, intercept: float = 0.0,
                 dtype=np.int16) -> np.ndarray:
    """(2**bits, C) uint8: row `v.view(uint)` is `window_reference` of stored value v."""
    return _cached(windows, slope, intercept, dtype)[0]


def _cached(windows, slope, intercept, dtype) -> tuple[np.ndarray, np.ndarray | None]:
    dtype = np.dtype(dtype).newbyteorder("=")
    if dtype not in _TABLE_DTYPES:
        raise ValueError(f"window tables exist for 8- and 16-bit integers, not {dtype}")
    key = tuple((float(lo), float(hi)) for lo, hi in windows)
    return _tables(key, float(slope), float(intercept), dtype.str)


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
    table, packed = _cached(windows, slope, intercept, native)
    index = np.ascontiguousarray(stored).view(f"u{native.itemsize}").reshape(-1)
    if packed is not None and sys.byteorder == "little":
        out = _gather_rgb(index, table, packed)
    else:
        # One C-byte row per pixel as an opaque item: a single gather, any channel count.
        rows = np.ascontiguousarray(table).view(f"V{table.shape[1]}").reshape(-1)
        out = np.take(rows, index).view(np.uint8)
    return out.reshape(stored.shape + (table.shape[1],))


_CHUNK = 1 << 18  # pixels per pass (a 512×512 slice): its 1 MiB of words is repacked from cache


def _gather_rgb(index: np.ndarray, table: np.ndarray, packed: np.ndarray) -> np.ndarray:
    """(N,) indices → (N, 3) rows of `table`. numpy gathers 4-byte items several times faster
    than 3-byte ones, so gather one word per pixel (R G B 0) and repack every 4 pixels into
    3 words of output: R0 G0 B0 R1 | G1 B1 R2 G2 | B2 R3 G3 B3 (little-endian)."""
    n = index.size
    body = n - n % 4
    out = np.empty((n, 3), np.uint8)
    words = out[:body].reshape(-1).view("<u4").reshape(-1, 3)  # (body / 4, 3)
    for start in range(0, body, _CHUNK):
        stop = min(start + _CHUNK, body)
        q = np.take(packed, index[start:stop]).reshape(-1, 4)  # (k, 4): words of 4 pixels
        w = words[start // 4:stop // 4]
        w[:, 0] = q[:, 0] | (q[:, 1] << 24)
        w[:, 1] = (q[:, 1] >> 8) | (q[:, 2] << 16)
        w[:, 2] = (q[:, 2] >> 16) | (q[:, 3] << 8)
    out[body:] = table[index[body:]]
    return out
