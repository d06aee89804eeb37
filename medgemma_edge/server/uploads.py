"""Images uploaded ahead of the question (POST /v1/images), kept in memory by id.

The store only stores: decoding an upload and drawing its preview live with the route
(server/images.py), on the runtime's one picture path. Nothing is written to disk: the pictures
are patient data, kept for the last `max_items` uploads and `max_bytes` of pixels.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field

from cachetools import LRUCache

from medgemma_edge.runtime.picture import Picture

UPLOAD_SCHEME = "medgemma-edge:image/"  # how a chat names an upload: UPLOAD_SCHEME + id


@dataclass
class Upload:
    id: str
    pictures: list[Picture]
    fit: str | None
    status: str = "encoding"  # → "ready" or "error" once the worker has encoded it
    error: str | None = None
    preview: bytes | None = field(default=None, repr=False)

    @property
    def labels(self) -> list[str]:
        return [p.label for p in self.pictures if p.label]

    @property
    def window(self) -> str | None:
        """The CT window the pictures were made with (the runtime records it), or None: not CT."""
        return self.pictures[0].window if self.pictures else None

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


class _Kept(LRUCache):
    """LRU by pixel bytes, and at most `max_items` entries. One upload larger than the whole
    byte budget is still kept, alone (counted at the budget), so the upload just made is usable."""

    def __init__(self, max_items: int, max_bytes: int):
        super().__init__(max_bytes, getsizeof=lambda upload: min(upload.nbytes, max_bytes))
        self.max_items = max_items

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        while len(self) > self.max_items:
            self.popitem()


class UploadStore:
    """The last `max_items` uploads (and at most `max_bytes` of their pixels), least recently used out.
    Thread-safe: routes add and read on the event loop, previews are drawn on worker threads."""

    def __init__(self, max_items: int, max_bytes: int):
        self.max_items, self.max_bytes = max_items, max_bytes
        self._items = _Kept(max_items, max_bytes)
        self._lock = threading.Lock()

    def add(self, pictures: list[Picture], fit: str | None) -> Upload:
        upload = Upload(secrets.token_hex(16), pictures, fit)  # 128 random bits: ids are not guessable
        with self._lock:
            self._items[upload.id] = upload
        return upload

    def get(self, upload_id: str) -> Upload | None:
        with self._lock:
            return self._items.get(upload_id)  # a hit counts as a use

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
