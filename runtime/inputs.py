"""One entry for every visual input: a picture, a DICOM file, a DICOM series.

Everything becomes a list of `Picture`s — uint8 RGB arrays of shape (H, W, 3) with an optional
text label (a CT/MR series gives one picture per kept slice, labelled `SLICE i`). The preprocessing
path (`runtime.preprocess`) takes it from there, so every backend sees the same pixels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_MAX_SLICES = 85  # MedGemma 1.5's CT/MR recipe keeps at most 85 slices of a volume


@dataclass
class Picture:
    pixels: np.ndarray  # (H, W, 3) uint8 RGB
    label: str | None = None  # text that follows the image in the prompt, e.g. "SLICE 3"


def is_dicom_path(src) -> bool:
    """True for DICOM bytes or a DICOM file (the 'DICM' marker at byte 128), a directory, or a list of paths."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return len(src) >= 132 and bytes(src[128:132]) == b"DICM"
    if isinstance(src, (list, tuple)):
        return len(src) > 0 and all(isinstance(p, (str, os.PathLike)) for p in src)
    if not isinstance(src, (str, os.PathLike)):
        return False
    path = Path(src)
    if path.is_dir():
        return True
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def load_pictures(src, *, window: str | None = None,
                  max_slices: int = DEFAULT_MAX_SLICES) -> list[Picture]:
    """Decode `src` (path, bytes, PIL image, array, DICOM file/dir/list) into pictures."""
    if is_dicom_path(src):
        from runtime import dicom

        return dicom.load_dicom(src, window=window, max_slices=max_slices)
    from runtime import images

    return [Picture(images.load_image(src))]
