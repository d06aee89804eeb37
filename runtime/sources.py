"""One entry for every visual input: a picture, a DICOM file, a DICOM series, a PDF document.

Everything becomes a list of `Picture`s — uint8 RGB arrays of shape (H, W, 3) with an optional
text label (a CT/MR series gives one picture per kept slice, labelled `SLICE i`; a PDF one per page,
`PAGE i`, with the page's text: runtime/pdf.py). The preprocessing
path (`runtime.preprocess`) takes it from there, so every backend sees the same pixels.

What a file is, is decided by its content, never its name: a PNG called `scan.dcm` is a picture
and a DICOM file called `xray.png` is DICOM. Files are opened through runtime/files.py only.
A whole-slide image (TIFF-based, vendor or DICOM WSI) becomes its sampled tissue patches, unlabelled
(runtime/wsi; OpenSlide reads it, after files.py has checked the file; a vendor name only lets
OpenSlide look, it never decides).
"""

from __future__ import annotations

import os
from pathlib import Path

from medgemma_edge.runtime.dicom.raw import looks_like_dicom
from medgemma_edge.runtime.files import read_head
from medgemma_edge.runtime.pdf import HEAD_BYTES, PdfOptions, load_pdf, looks_like_pdf
from medgemma_edge.runtime.picture import DEFAULT_MAX_SLICES, Picture
from medgemma_edge.runtime.wsi.slide import HEAD as SLIDE_HEAD, is_slide_head, slide_path


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


def is_pdf(src) -> bool:
    """True for PDF bytes or a PDF file, by content ('%PDF-' in the first 1024 bytes), unless it is
    DICOM (an encapsulated PDF's header can sit that early: DICOM decides, as in load_pictures)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        head = bytes(src[:HEAD_BYTES])
    elif isinstance(src, (str, os.PathLike)) and not Path(src).is_dir():
        head = read_head(src, HEAD_BYTES)
    else:
        return False
    return looks_like_pdf(head) and not looks_like_dicom(head[:132])


def load_pictures(src, *, window: str | None = None, max_slices: int = DEFAULT_MAX_SLICES,
                  pdf: PdfOptions | None = None) -> list[Picture]:
    """Decode `src` (path, bytes, PIL image, array, DICOM file/dir, a list of DICOM paths or bytes
    of one series, a PDF, or Pictures decoded before) into pictures. Pictures decoded before (a
    server upload, a series `ask --budget` planned on, a PDF `ask` read with its --pdf options) come
    back as they are: window, max_slices and pdf were applied when they were decoded. pdf: the
    PDF options (None: runtime/pdf.py's defaults)."""
    if isinstance(src, Picture) or (isinstance(src, (list, tuple)) and src
                                    and all(isinstance(p, Picture) for p in src)):
        return list(src) if isinstance(src, (list, tuple)) else [src]  # decoded already
    if slide_path(src) is not None:  # a whole-slide image (a DICOM WSI too): its tissue patches
        from medgemma_edge.runtime.wsi import load_slide

        return load_slide(src, max_slices=max_slices)
    if isinstance(src, (bytes, bytearray, memoryview)) and is_slide_head(bytes(src[:SLIDE_HEAD])):  # an upload
        from medgemma_edge.runtime.wsi import load_slide_bytes

        patches = load_slide_bytes(bytes(src), max_slices=max_slices)
        if patches is not None:
            return patches
    if is_dicom_path(src):
        # Imported here, not at the top: pydicom is slow to import and a PNG never needs it.
        from medgemma_edge.runtime import dicom

        return dicom.load_dicom(src, window=window, max_slices=max_slices)
    if is_pdf(src):  # pypdfium2 is imported on the first PDF only
        return load_pdf(src, pdf or PdfOptions())
    from medgemma_edge.runtime import images

    return [Picture(images.load_image(src))]
