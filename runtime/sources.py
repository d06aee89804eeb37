"""One entry for every visual input: a picture, a DICOM file, a DICOM series.

Everything becomes a list of `Picture`s — uint8 RGB arrays of shape (H, W, 3) with an optional
text label (a CT/MR series gives one picture per kept slice, labelled `SLICE i`). The preprocessing
path (`runtime.preprocess`) takes it from there, so every backend sees the same pixels.

What a file is, is decided by its content, never its name: a PNG called `scan.dcm` is a picture
and a DICOM file called `xray.png` is DICOM. Files are opened through runtime/files.py only.
"""

from __future__ import annotations

import os
from pathlib import Path

from medgemma_edge.runtime.dicom.raw import looks_like_dicom
from medgemma_edge.runtime.files import read_head
from medgemma_edge.runtime.picture import DEFAULT_MAX_SLICES, Picture


def is_dicom_path(src) -> bool:
    """True for DICOM bytes or a DICOM file (by content: 'DICM' at byte 128, or a bare dataset),
    a directory, or a list of paths. A path that is no regular file is refused here (InputError),
    before anything waits on it."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return looks_like_dicom(bytes(src[:132]))
    if isinstance(src, (list, tuple)):
        return len(src) > 0 and (all(isinstance(p, (str, os.PathLike)) for p in src)
                                 or all(isinstance(p, (bytes, bytearray, memoryview)) for p in src))
    if not isinstance(src, (str, os.PathLike)):
        return False
    if Path(src).is_dir():
        return True
    return looks_like_dicom(read_head(src, 132))


def load_pictures(src, *, window: str | None = None, max_slices: int = DEFAULT_MAX_SLICES) -> list[Picture]:
    """Decode `src` (path, bytes, PIL image, array, DICOM file/dir, a list of DICOM paths or bytes
    of one series, or Pictures decoded before) into pictures. Pictures decoded before (a server
    upload, a series `ask --budget` planned on) come back as they are: window and max_slices were
    applied when they were decoded."""
    if isinstance(src, Picture) or (isinstance(src, (list, tuple)) and src
                                    and all(isinstance(p, Picture) for p in src)):
        return list(src) if isinstance(src, (list, tuple)) else [src]  # decoded already
    if is_dicom_path(src):
        # Imported here, not at the top: pydicom is slow to import and a PNG never needs it.
        from medgemma_edge.runtime import dicom

        return dicom.load_dicom(src, window=window, max_slices=max_slices)
    from medgemma_edge.runtime import images

    return [Picture(images.load_image(src))]
