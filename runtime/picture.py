"""A `Picture`: what every visual input becomes (runtime/sources.py) and what preprocessing takes.

A leaf module — it imports nothing of ours — so the DICOM package and the source dispatcher can
both name it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_MAX_SLICES = 85  # MedGemma 1.5's CT/MR recipe keeps at most 85 slices of a volume


@dataclass
class Picture:
    pixels: np.ndarray  # (H, W, 3) uint8 RGB
    label: str | None = None  # text that follows the image in the prompt, e.g. "SLICE 3"
