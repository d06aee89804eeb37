"""Image-embedding cache: content hash of the preprocessed pixels → the vision encoder's output.

On a clinic CPU one 896² image costs the 4B vision tower about a minute; the same X-ray asked
about again (a follow-up, a second question tomorrow) should not pay that twice.

- Memory: the last `memory_items` images (LRU), always on.
- Disk: optional, off unless a folder is given. One `.npy` per image under a subfolder named
  for the vision file's SHA-256 (so another bundle never reads these), written atomically,
  bounded by `disk_mb` (least recently used files go first). The files hold embeddings
  computed from patient images: they are patient data at rest, so the bundle's subfolder is
  kept owner-only (0700; a folder of another user is refused), half-written files from a crash
  are removed, and the file names are hashes, never names or DICOM tags. A file that
  does not read back as the right shape is deleted and the image encoded again.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from runtime.errors import InputError

DEFAULT_MEMORY_ITEMS = 64  # 4B: 256 × 2560 floats ≈ 2.6 MB each
DEFAULT_DISK_MB = 2048


def _make_private(folder: Path) -> None:
    """The bundle's cache folder must be ours and closed to others: anyone who can write there
    could plant embeddings for an image they know, and anyone who can read, take them."""
    st = folder.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise InputError(f"the image cache folder {folder} belongs to another user — choose a folder "
                         "of your own with --image-cache")
    if st.st_mode & 0o077:
        os.chmod(folder, 0o700)


def pixel_digest(pixels: np.ndarray) -> str:
    """The cache key of one preprocessed image: shape and bytes, hashed."""
    h = hashlib.sha256(repr((pixels.shape, str(pixels.dtype))).encode())
    h.update(np.ascontiguousarray(pixels).data)
    return h.hexdigest()[:32]


class EmbeddingCache:
    def __init__(self, shape: tuple[int, int], model_id: str, *, memory_items: int = DEFAULT_MEMORY_ITEMS,
                 disk_dir: str | os.PathLike | None = None, disk_mb: float = DEFAULT_DISK_MB):
        self.shape = tuple(shape)  # (tokens per image, embedding width)
        self.memory_items = max(0, int(memory_items))
        self._mem: OrderedDict[str, np.ndarray] = OrderedDict()
        self.disk_limit = int(disk_mb * 1024 * 1024)
        self.dir = None
        if disk_dir is not None:
            root = Path(disk_dir).expanduser()
            root.mkdir(parents=True, exist_ok=True, mode=0o700)  # an existing folder keeps its mode
            self.dir = root / model_id[:16]
            self.dir.mkdir(exist_ok=True, mode=0o700)
            _make_private(self.dir)
            self._drop_stale_parts()
        self.hits = {"memory": 0, "disk": 0}

    # -- lookup ----------------------------------------------------------------------------------
    def get(self, digest: str) -> tuple[np.ndarray | None, str | None]:
        """(embeddings, where) — where is 'memory', 'disk', or None on a miss."""
        if digest in self._mem:
            self._mem.move_to_end(digest)
            self.hits["memory"] += 1
            return self._mem[digest], "memory"
        emb = self._read(digest)
        if emb is not None:
            self._remember(digest, emb)
            self.hits["disk"] += 1
            return emb, "disk"
        return None, None

    def put(self, digest: str, emb: np.ndarray) -> None:
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        self._remember(digest, emb)
        if self.dir is not None:
            self._write(digest, emb)

    def _remember(self, digest: str, emb: np.ndarray) -> None:
        if self.memory_items == 0:
            return
        self._mem[digest] = emb
        self._mem.move_to_end(digest)
        while len(self._mem) > self.memory_items:
            self._mem.popitem(last=False)

    # -- disk ------------------------------------------------------------------------------------
    def _path(self, digest: str) -> Path:
        return self.dir / f"{digest}.npy"

    def _read(self, digest: str) -> np.ndarray | None:
        if self.dir is None:
            return None
        path = self._path(digest)
        try:
            emb = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError):  # truncated or foreign file: drop it, encode again
            path.unlink(missing_ok=True)
            return None
        if emb.dtype != np.float32 or emb.shape != self.shape or not np.isfinite(emb).all():
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)  # recently used: evicted last
        except OSError:
            pass
        return emb

    def _write(self, digest: str, emb: np.ndarray) -> None:
        try:
            fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".part")
        except OSError:  # a full or read-only disk costs speed, never the answer
            return
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, emb, allow_pickle=False)
            os.replace(tmp, self._path(digest))
        except OSError:
            Path(tmp).unlink(missing_ok=True)
            return
        self._evict()

    def _drop_stale_parts(self, older_than_s: float = 600) -> None:
        """A crash mid-write leaves a .part file (patient-derived data): remove old ones."""
        now = time.time()
        for p in self.dir.glob("*.part"):
            try:
                if now - p.stat().st_mtime > older_than_s:
                    p.unlink()
            except OSError:
                pass

    def _evict(self) -> None:
        entries = []
        for p in self.dir.glob("*.npy"):
            try:
                st = p.stat()
            except OSError:
                continue
            entries.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        for _, size, p in sorted(entries, key=lambda e: e[0]):
            if total <= self.disk_limit:
                break
            p.unlink(missing_ok=True)
            total -= size

    def disk_usage(self) -> tuple[int, int]:
        """(files, bytes) in this bundle's disk folder; (0, 0) without one."""
        if self.dir is None:
            return 0, 0
        sizes = [p.stat().st_size for p in self.dir.glob("*.npy")]
        return len(sizes), sum(sizes)
