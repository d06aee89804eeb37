"""A `Picture`: what every visual input becomes (runtime/sources.py) and what preprocessing takes.

A leaf module — it imports nothing of ours — so the DICOM package and the source dispatcher can
both name it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

DEFAULT_MAX_SLICES = 85  # MedGemma 1.5's CT/MR recipe keeps at most 85 slices of a volume


@dataclass
class Picture:
    pixels: np.ndarray  # (H, W, 3) uint8 RGB
    label: str | None = None  # text that follows the image in the prompt, e.g. "SLICE 3"
    window: str | None = None  # the CT window it was made with (preset name or HU ranges); None: not windowed CT
    text: str | None = None  # a PDF page's text layer, given after the label ("[PAGE 2 TEXT]\n…"; runtime/pdf.py)


def as_slices(pictures: list[Picture]) -> list[Picture]:
    """The kept slices of one series as the prompt shows them: `SLICE i` after each when there are
    several, no label for a single one."""
    if len(pictures) == 1:
        return [replace(pictures[0], label=None)]
    return [replace(p, label=f"SLICE {i}") for i, p in enumerate(pictures, start=1)]
