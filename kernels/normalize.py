"""uint8 pixels -> the float32, channels-first tensor SigLIP takes: (x * scale - mean) / std.

A uint8 input has only 256 values, so the arithmetic is done once per value into a lookup table
and the picture becomes one gather per channel, written straight into its channels-first slot
(the layout change costs nothing extra). The table is built with transformers' exact sequence of
roundings (float64 multiply, cast to float32, float32 subtract and divide), so the result equals
Gemma3ImageProcessor's bit for bit, not merely to a tolerance.

`normalize_reference` does the same arithmetic pixel by pixel; the tests hold the two equal.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def build_lut(scale: float, mean: float | Sequence[float], std: float | Sequence[float],
              channels: int = 3) -> np.ndarray:
    """(channels, 256) float32: the normalized value of every uint8 level, per channel."""
    levels = (np.arange(256, dtype=np.float64) * scale).astype(np.float32)  # (256,)
    mean32 = _per_channel(mean, channels)[:, None]  # (C, 1)
    std32 = _per_channel(std, channels)[:, None]
    return (levels[None, :] - mean32) / std32  # (C, 256) float32


def normalize(pixels: np.ndarray, lut: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """(H, W) gray or (H, W, C) uint8 -> (C, H, W) float32 through `lut` (from `build_lut`).

    A gray plane is looked up through every channel's table: no (H, W, C) copy is made.
    `out`, when given, is filled in place (e.g. one slot of a preallocated batch).
    """
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise ValueError(f"expected (H, W) or (H, W, C) uint8, got {pixels.shape} {pixels.dtype}")
    channels = lut.shape[0]
    if lut.ndim != 2 or lut.shape[1] != 256:
        raise ValueError(f"expected a (C, 256) table from build_lut, got {lut.shape}")
    if pixels.ndim == 3 and pixels.shape[2] != channels:
        raise ValueError(f"{pixels.shape[2]} channels in the picture, {channels} in the table")
    h, w = pixels.shape[:2]
    if out is None:
        out = np.empty((channels, h, w), dtype=np.float32)
    for c in range(channels):
        plane = pixels if pixels.ndim == 2 else pixels[:, :, c]
        # uint8 indices never leave the 256-row table; mode="clip" lets numpy write straight
        # into `out` (the default mode="raise" gathers into a buffer first, then copies)
        np.take(lut[c], plane, out=out[c], mode="clip")
    return out


def normalize_reference(pixels: np.ndarray, scale: float, mean: float | Sequence[float],
                        std: float | Sequence[float], channels: int = 3) -> np.ndarray:
    """Plain per-pixel version of `normalize` (transformers' rescale then normalize)."""
    rgb = pixels if pixels.ndim == 3 else np.repeat(pixels[:, :, None], channels, axis=2)
    x = (rgb.astype(np.float64) * scale).astype(np.float32)  # (H, W, C)
    x = (x - _per_channel(mean, channels)) / _per_channel(std, channels)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (C, H, W)


def _per_channel(value: float | Sequence[float], channels: int) -> np.ndarray:
    values = np.atleast_1d(np.asarray(value, dtype=np.float32))
    if values.size == 1:
        values = np.repeat(values, channels)
    if values.size != channels:
        raise ValueError(f"need 1 or {channels} values, got {values.size}")
    return values
