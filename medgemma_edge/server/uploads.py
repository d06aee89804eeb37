"""Images uploaded ahead of the question (POST /v1/images): decoded once, kept in memory by id.

An upload is decoded (DICOM windowed, series ordered and thinned) when it arrives, so a bad file
is refused at once; the model worker then encodes it in the background, and a chat naming
`medgemma-edge:image/<id>` finds its embeddings in the image cache. Nothing is written to disk:
the pictures are patient data, kept for the last `max_items` uploads and `max_bytes` of pixels.
"""

from __future__ import annotations

import collections
import io
import secrets
import threading
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from medgemma_edge.runtime.dicom.windows import DEFAULT_PRESET
from medgemma_edge.runtime.picture import DEFAULT_MAX_SLICES, Picture
from medgemma_edge.runtime.preprocess import model_view
from medgemma_edge.runtime.preview import contact_sheet
from medgemma_edge.runtime.sources import load_pictures
from medgemma_edge.server.errors import ApiError
from medgemma_edge.server.translate import UPLOAD_SCHEME, is_dicom

SHEET_TILE = 256  # a series preview shows each slice at this size: 85 slices at 896 px would be a 200 MB PNG


@dataclass
class Upload:
    id: str
    pictures: list[Picture]
    window: str | None  # the CT window applied, or None (not CT)
    fit: str | None
    status: str = "encoding"  # → "ready" or "error" once the worker has encoded it
    error: str | None = None
    preview: bytes | None = field(default=None, repr=False)

    @property
    def labels(self) -> list[str]:
        return [p.label for p in self.pictures if p.label]

    @property
    def nbytes(self) -> int:
        return sum(p.pixels.nbytes for p in self.pictures)

    def describe(self) -> dict:
        return {"id": self.id, "status": self.status, "error": self.error, "pictures": len(self.pictures),
                "labels": self.labels, "window": self.window}

    def created(self) -> dict:
        """What POST /v1/images answers."""
        return {"id": self.id, "url": UPLOAD_SCHEME + self.id, "pictures": len(self.pictures),
                "labels": self.labels, "window": self.window, "preview": f"/v1/images/{self.id}/preview.png",
                "status": self.status}


class UploadStore:
    """The last `max_items` uploads (and at most `max_bytes` of their pixels), least recently used out."""

    def __init__(self, max_items: int, max_bytes: int):
        self.max_items, self.max_bytes = max_items, max_bytes
        self._items: collections.OrderedDict[str, Upload] = collections.OrderedDict()
        self._lock = threading.Lock()

    def add(self, pictures: list[Picture], window: str | None, fit: str | None) -> Upload:
        upload = Upload(secrets.token_hex(16), pictures, window, fit)  # 128 random bits: ids are not guessable
        with self._lock:
            self._items[upload.id] = upload
            while len(self._items) > self.max_items or (
                    len(self._items) > 1 and sum(u.nbytes for u in self._items.values()) > self.max_bytes):
                self._items.popitem(last=False)
        return upload

    def get(self, upload_id: str) -> Upload | None:
        with self._lock:
            upload = self._items.get(upload_id)
            if upload is not None:
                self._items.move_to_end(upload_id)
            return upload

    def __len__(self) -> int:
        return len(self._items)


def decode(blobs: list[tuple[str, bytes]], options: dict) -> tuple[list[Picture], str | None]:
    """Pictures of one upload (a picture, a DICOM file, or the DICOM files of one series), and the
    CT window used. Runs off the event loop: a CT series takes seconds."""
    dicom = [is_dicom(mime, data) for mime, data in blobs]
    if len(blobs) > 1 and not all(dicom):
        raise ApiError(400, "several files in one upload must all be DICOM files of one series — upload "
                            "pictures one at a time", "file")
    source = blobs[0][1] if len(blobs) == 1 else [data for _, data in blobs]
    window = options.get("window")
    pictures = load_pictures(source, window=window, max_slices=options.get("max_slices", DEFAULT_MAX_SLICES))
    used = (window or DEFAULT_PRESET) if dicom[0] and _modality(blobs[0][1]) == "CT" else None
    return pictures, used


def _modality(data: bytes) -> str | None:
    """The Modality tag only (the file was already read whole by load_pictures, so it parses)."""
    import pydicom

    from medgemma_edge.runtime.dicom.read import quiet_pydicom

    with quiet_pydicom():
        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True,
                                 specific_tags=["Modality"])
        except Exception:
            return None
    return str(ds.get("Modality") or "").upper() or None


def preview_png(upload: Upload, image_size: int, fit: str | None) -> bytes:
    """PNG of what the model sees: the one view, or a labelled contact sheet of a series."""
    if upload.preview is None:
        pixels = [p.pixels for p in upload.pictures]
        kwargs = {"fit": fit} if fit else {}
        if len(pixels) == 1:
            sheet = model_view(pixels, image_size, threads=1, **kwargs)[0]
        else:
            views = model_view(pixels, min(image_size, SHEET_TILE), threads=1, **kwargs)
            sheet = contact_sheet(views, [p.label for p in upload.pictures])
        out = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(sheet)).save(out, format="PNG")
        upload.preview = out.getvalue()
    return upload.preview
