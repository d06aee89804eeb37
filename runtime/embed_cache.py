"""Image-embedding cache: content hash of the preprocessed pixels → the vision encoder's output.

On a clinic CPU one 896² image costs the 4B vision tower many seconds (benchmarks/results/REPORT.md);
the same X-ray asked about again (a follow-up, a second question tomorrow) should not pay that twice.

- Memory: the last `memory_items` images (LRU, cachetools), always on.
- Blobs (disk only): evaluated prompt prefixes (llama.cpp's sequence state after a study's
  images, runtime/model.py), under the same folder, names, bounds and rules.
- Disk: optional, off unless a folder is given. One `.npy` per image under a subfolder named
  for the vision file's SHA-256 (so another bundle never reads these), written atomically,
  bounded by `disk_mb` (least recently used files go first). The files hold embeddings
  computed from patient images: they are patient data at rest. The file names are hashes,
  never names or DICOM tags. A file that does not read back as the right shape is deleted
  and the image encoded again.

The disk folder is a place another user may try to steer (issue 12), so one mechanism guards it:
the root and the bundle's subfolder are opened once as directory descriptors without following a
symbolic link (O_NOFOLLOW), checked on the open descriptor (fstat, so a path swapped afterwards
changes nothing), and every later file operation is relative to the subfolder's descriptor.
- The root must be ours and writable by nobody else; a missing root is created 0700.
- The subfolder must be ours; it is set to 0700 (closed to others, writable by us).
- Only names the cache makes (32 hex digits + `.npy`, or its `.part` form) are ever read,
  counted or deleted; anything else in the folder is left alone.
- An entry is opened O_NONBLOCK | O_NOFOLLOW and must fstat as a regular file, so a FIFO or a
  symbolic link planted under an entry's name is dropped as damaged instead of hanging or
  leading elsewhere.
A folder that cannot be used is one InputError at construction; a full disk or an unwritable
file later costs speed (the image is encoded again), never the answer.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import stat
import threading
import time
import weakref
from pathlib import Path

import numpy as np
from cachetools import LRUCache

from medgemma_edge.runtime.errors import InputError

DEFAULT_MEMORY_ITEMS = 64  # 4B: 256 × 2560 floats ≈ 2.6 MB each
DEFAULT_DISK_MB = 2048
STALE_PART_S = 600  # a .part older than this is a crash's leftover, not a write in progress

# The only names the cache reads, counts or deletes. `tmp…part` is what tempfile.mkstemp named
# half-written files in earlier versions; a crash of one of those left patient data behind.
_ENTRY = re.compile(r"[0-9a-f]{32}\.npy")
_PART = re.compile(r"[0-9a-f]{32}\.[0-9a-f]{16}\.part|tmp[a-z0-9_]{8}\.part")
_BLOB = "blob:"  # key prefix of blob entries: never the same name as an image's embeddings
_NPY_HEADER_MAX = 4096  # numpy pads a .npy header to 64 or 128 bytes; anything far larger is not ours

_SAFE = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _SAFE
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | _SAFE  # a FIFO opens at once, unread
_PART_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _SAFE
# Everything below is relative to a directory descriptor; a system without that gets no disk cache.
_HAS_DIR_FD = os.open in os.supports_dir_fd and os.scandir in os.supports_fd
_ADVICE = "choose a folder of your own that only you can write to with --image-cache, or leave it out"


def pixel_digest(pixels: np.ndarray) -> str:
    """The cache key of one preprocessed image: shape and bytes, hashed."""
    h = hashlib.sha256(repr((pixels.shape, str(pixels.dtype))).encode())
    h.update(np.ascontiguousarray(pixels).data)
    return h.hexdigest()[:32]


def _hex_name(key: str, length: int) -> str:
    """`key` itself when it already is `length` lowercase hex digits (a pixel_digest, a SHA-256),
    else a hash of it: a caller's key never becomes a path ("../x") or a name outside _ENTRY."""
    if re.fullmatch(f"[0-9a-f]{{{length}}}", key):
        return key
    return hashlib.sha256(key.encode()).hexdigest()[:length]


def _refusal(path: Path, err: OSError, is_link: bool) -> InputError:
    if is_link:  # Linux reports O_DIRECTORY|O_NOFOLLOW on a link as ENOTDIR, hence the lstat
        why = "it is a symbolic link, and the cache never follows one (it could lead to another user's files)"
    elif err.errno in (errno.ENOTDIR, errno.EEXIST):
        why = "it, or a folder above it, is not a folder"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "it cannot be written (permission denied or a read-only disk)"
    else:
        why = err.strerror or str(err)
    return InputError(f"cannot use {path} for the image cache: {why} — {_ADVICE}")


def _is_link(name: str | Path, dir_fd: int | None = None) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _open_root(root: Path) -> int:
    """The cache root as a directory descriptor, after checking that nobody else can steer it:
    whoever can write the root can swap the bundle's subfolder for one of their own."""
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)  # only a missing leaf gets 0700; parents are the user's
        fd = os.open(root, _DIR_FLAGS)
    except OSError as err:
        raise _refusal(root, err, _is_link(root)) from err
    st = os.fstat(fd)
    problem = None
    if st.st_uid != os.geteuid():
        problem = "belongs to another user"
    elif st.st_mode & 0o022:  # sticky or not: another user could still plant the subfolder first
        problem = f"can be written by other users (mode {stat.S_IMODE(st.st_mode):o}; `chmod go-w` it)"
    if problem:
        os.close(fd)
        raise InputError(f"the image cache folder {root} {problem} — {_ADVICE}")
    return fd


def _open_bundle_folder(root_fd: int, name: str, shown: Path) -> int:
    """The bundle's subfolder of the root, as a descriptor: ours, and 0700 — anyone who can write
    there could plant embeddings for an image they know, and anyone who can read, take them."""
    try:
        try:
            os.mkdir(name, 0o700, dir_fd=root_fd)
        except FileExistsError:
            pass
        fd = os.open(name, _DIR_FLAGS, dir_fd=root_fd)
    except OSError as err:
        raise _refusal(shown, err, _is_link(name, root_fd)) from err
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise InputError(f"the image cache folder {shown} belongs to another user — {_ADVICE}")
        if stat.S_IMODE(st.st_mode) != 0o700:  # ours: close it to others, open it to us
            try:
                os.fchmod(fd, 0o700)
            except OSError as err:
                raise _refusal(shown, err, False) from err
    except BaseException:
        os.close(fd)
        raise
    return fd


class EmbeddingCache:
    def __init__(self, shape: tuple[int, int], model_id: str, *, memory_items: int = DEFAULT_MEMORY_ITEMS,
                 disk_dir: str | os.PathLike | None = None, disk_mb: float = DEFAULT_DISK_MB):
        self.shape = tuple(shape)  # (tokens per image, embedding width)
        self.memory_items = max(0, int(memory_items))
        # A hit counts as a use. Locked: lookups also come from outside the model's lock
        # (runtime/budget.py), and cachetools' LRUCache is not thread-safe by itself.
        self._mem = LRUCache(self.memory_items) if self.memory_items else None
        self._mem_lock = threading.Lock()
        self.disk_limit = int(disk_mb * 1024 * 1024)
        self.dir = None  # the subfolder's path, for people and tests; file operations use _dir_fd
        self._dir_fd = None
        if disk_dir is not None:
            if not _HAS_DIR_FD:
                raise InputError("the disk image cache needs a POSIX system — leave out --image-cache")
            root = Path(disk_dir).expanduser()
            name = _hex_name(model_id, 64)[:16]
            root_fd = _open_root(root)
            try:
                self._dir_fd = _open_bundle_folder(root_fd, name, root / name)
            finally:
                os.close(root_fd)
            weakref.finalize(self, os.close, self._dir_fd)
            self.dir = root / name
            self._drop_stale_parts()
        self.hits = {"memory": 0, "disk": 0}

    # -- lookup ----------------------------------------------------------------------------------
    def get(self, digest: str) -> tuple[np.ndarray | None, str | None]:
        """(embeddings, where) — where is 'memory', 'disk', or None on a miss."""
        emb = self._recall(digest)
        if emb is not None:
            self.hits["memory"] += 1
            return emb, "memory"
        emb = self._read(digest)
        if emb is not None:
            self._remember(digest, emb)
            self.hits["disk"] += 1
            return emb, "disk"
        return None, None

    def put(self, digest: str, emb: np.ndarray) -> None:
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        self._remember(digest, emb)
        if self._dir_fd is not None:
            self._write(digest, emb)

    def _recall(self, digest: str) -> np.ndarray | None:
        if self._mem is None:
            return None
        with self._mem_lock:
            return self._mem.get(digest)

    def _remember(self, digest: str, emb: np.ndarray) -> None:
        if self._mem is not None:
            with self._mem_lock:
                self._mem[digest] = emb

    def forget_memory(self) -> None:
        """Drop the in-memory entries (the model is unloaded: runtime/residency.py); the disk keeps its own."""
        if self._mem is not None:
            with self._mem_lock:
                self._mem.clear()

    # -- disk ------------------------------------------------------------------------------------
    def _name(self, digest: str) -> str:
        return f"{_hex_name(digest, 32)}.npy"

    def _path(self, digest: str) -> Path:
        return self.dir / self._name(digest)

    # -- blobs: evaluated prompt prefixes (llama.cpp sequence states), disk only ------------------
    def get_blob(self, key: str) -> bytes | None:
        """The bytes stored under `key`, or None (no disk folder, a miss, or a damaged file)."""
        arr = self._read(_BLOB + key, blob=True)
        return None if arr is None else arr.tobytes()

    def has_blob(self, key: str) -> bool:
        if self._dir_fd is None:
            return False
        try:
            st = os.stat(self._name(_BLOB + key), dir_fd=self._dir_fd, follow_symlinks=False)
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode)

    def put_blob(self, key: str, data: bytes) -> None:
        """Store bytes on disk under `key` (nothing without a disk folder; too large: not kept)."""
        if self._dir_fd is not None and 0 < len(data) <= self.disk_limit:
            self._write(_BLOB + key, np.frombuffer(data, dtype=np.uint8))

    def drop_blob(self, key: str) -> None:
        """Delete the blob stored under `key`, if any (a paused preparation's partial state)."""
        if self._dir_fd is not None:
            self._drop(self._name(_BLOB + key))

    def _read(self, digest: str, blob: bool = False) -> np.ndarray | None:
        if self._dir_fd is None:
            return None
        name = self._name(digest)
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=self._dir_fd)
        except FileNotFoundError:
            return None
        except OSError as err:  # a symbolic link (never followed) or unreadable: drop it, encode again
            if err.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):  # short of fds, not a bad file
                self._drop(name)
            return None
        try:
            emb = self._load(fd, blob)
        except (OSError, ValueError, EOFError):  # truncated or foreign file
            emb = None
        if emb is None:
            self._drop(name)
        return emb

    def _load(self, fd: int, blob: bool = False) -> np.ndarray | None:
        """The embeddings (or blob bytes) in an open entry, or None if it is not one this cache wrote."""
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            nbytes = int(np.prod(self.shape)) * 4
            size_ok = 0 < st.st_size <= self.disk_limit + _NPY_HEADER_MAX if blob else \
                nbytes < st.st_size <= nbytes + _NPY_HEADER_MAX
            # Checked before any read: a FIFO would block, a huge header would allocate.
            if not stat.S_ISREG(st.st_mode) or not size_ok:
                return None
            emb = np.load(f, allow_pickle=False)
            if blob:
                if emb.dtype != np.uint8 or emb.ndim != 1:
                    return None
            elif emb.dtype != np.float32 or emb.shape != self.shape or not np.isfinite(emb).all():
                return None
            try:
                os.utime(fd)  # recently used: evicted last
            except OSError:
                pass
            return emb

    def _write(self, digest: str, emb: np.ndarray) -> None:
        name = self._name(digest)
        part = f"{name[:-4]}.{secrets.token_hex(8)}.part"  # _PART's form, so a crash's leftover is ours to remove
        try:
            fd = os.open(part, _PART_FLAGS, 0o600, dir_fd=self._dir_fd)
        except OSError:  # a full or read-only disk costs speed, never the answer
            return
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, emb, allow_pickle=False)
            os.replace(part, name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        except OSError:
            self._drop(part)
            return
        self._evict()

    def _drop(self, name: str) -> None:
        try:
            os.unlink(name, dir_fd=self._dir_fd)  # unlink removes a link itself, never its target
        except OSError:
            pass

    def _own_files(self, pattern: re.Pattern) -> list[tuple[str, os.stat_result]]:
        """(name, lstat) of the regular files in the bundle's folder named as the cache names them."""
        found = []
        try:
            with os.scandir(self._dir_fd) as it:
                for entry in it:
                    if not pattern.fullmatch(entry.name):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if stat.S_ISREG(st.st_mode):
                        found.append((entry.name, st))
        except OSError:
            pass
        return found

    def _drop_stale_parts(self, older_than_s: float = STALE_PART_S) -> None:
        """A crash mid-write leaves a .part file (patient-derived data): remove old ones."""
        now = time.time()
        for name, st in self._own_files(_PART):
            if now - st.st_mtime > older_than_s:
                self._drop(name)

    def _evict(self) -> None:
        entries = self._own_files(_ENTRY)
        total = sum(st.st_size for _, st in entries)
        for name, st in sorted(entries, key=lambda e: e[1].st_mtime):
            if total <= self.disk_limit:
                break
            self._drop(name)
            total -= st.st_size

    def disk_usage(self) -> tuple[int, int]:
        """(files, bytes) of this bundle's cache entries on disk; (0, 0) without a disk folder."""
        if self._dir_fd is None:
            return 0, 0
        entries = self._own_files(_ENTRY)
        return len(entries), sum(st.st_size for _, st in entries)
