"""A prior X-ray beside the current one (longitudinal chest X-ray), as Google's notebook asks it:
https://github.com/Google-Health/medgemma/blob/80a1de1e1a306a24b69b7af4009f326bd6bae644/notebooks/cxr_longitudinal_comparison_with_hugging_face.ipynb

Its layout, followed exactly: no system prompt; one user message holding the prior image, then the
current image, then the question; no labels between them. Its question is the default
(`runtime.presets.LONGITUDINAL_CXR`). `ask --prior` and the server's prior part build these
messages; a Python caller calls `longitudinal_messages` and hands them to `model.chat`.

Pairing the two pictures is the caller's job: nothing here reads a name, a date or any other tag
to match them (no PHI is read). Each is one picture (a photo, a PNG, one single-frame DICOM
X-ray, windowed as any other); a series, a folder or a multi-frame file is refused in one line.
"""

from __future__ import annotations

import os
from pathlib import Path

from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.presets import LONGITUDINAL_CXR

RECIPE = ("https://github.com/Google-Health/medgemma/blob/80a1de1e1a306a24b69b7af4009f326bd6bae644/"
          "notebooks/cxr_longitudinal_comparison_with_hugging_face.ipynb")
PROMPT = LONGITUDINAL_CXR


def longitudinal_messages(current, prior, question: str | None = None, system: str | None = None) -> list[dict]:
    """The notebook's messages: [user: prior image, current image, question]. `current` and
    `prior` are anything an image item takes (path, bytes, PIL image, array, DICOM file);
    question None: the notebook's prompt; system: a system message first (the notebook has none)."""
    if question is not None and not isinstance(question, str):
        raise InputError(f"question must be text, got {type(question).__name__}")
    if system is not None and not isinstance(system, str):
        raise InputError(f"system must be text or None, got {type(system).__name__}")
    content = [{"type": "image", "image": prior}, {"type": "image", "image": current},
               {"type": "text", "text": PROMPT if question is None else question}]
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]


def check_one_picture(src, what: str) -> None:
    """InputError in one line unless `src` is one picture: a folder or list of files (a series),
    or a DICOM file holding several frames, is refused. DICOM is read to its header, not decoded."""
    from medgemma_edge.runtime.picture import Picture
    from medgemma_edge.runtime.sources import is_dicom_path

    why = "— give one X-ray (one picture or one single-frame DICOM file)"
    if isinstance(src, (list, tuple)):
        if len(src) != 1:
            raise InputError(f"{what} is {len(src)} pictures or files (a series) {why}")
        src = src[0]
    if isinstance(src, Picture):
        return
    if isinstance(src, (str, os.PathLike)) and Path(src).is_dir():
        raise InputError(f"{what} is a folder (a series) {why}")
    if not is_dicom_path(src):
        from medgemma_edge.runtime import sources

        is_pdf = getattr(sources, "is_pdf", None)  # PDF documents: one picture per page
        if is_pdf is not None and is_pdf(src):
            raise InputError(f"{what} is a PDF document {why}")
        return  # a picture file, bytes, PIL image or array: one picture
    from medgemma_edge.runtime.dicom.read import quiet_pydicom
    from medgemma_edge.runtime.dicom.series import gather

    with quiet_pydicom():
        slices = gather(src, 2)  # two kept: it holds more than one
    if len(slices) > 1:
        raise InputError(f"{what} holds several frames or slices {why}")


def one_picture(src, what: str, *, window: str | None = None):
    """`src` decoded (the same picture/X-ray path as any image: DICOM X-rays windowed as ever) as
    the one `Picture` it must be; InputError in one line for a series, a multi-frame or multi-page
    file, a whole-slide image — anything that decodes to more than one picture."""
    from medgemma_edge.runtime.sources import load_pictures

    check_one_picture(src, what)
    pictures = load_pictures(src, window=window, max_slices=2)
    if len(pictures) != 1:
        raise InputError(f"{what} decodes to several pictures (frames, slices, pages or patches) — give one X-ray "
                         "(one picture or one single-frame DICOM file)")
    return pictures[0]
