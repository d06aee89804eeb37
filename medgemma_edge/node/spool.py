"""The spool: received DICOM instances on disk, durable before their C-STORE is acknowledged.

Layout (no UID and no patient value in any name; a UID can identify a study):

    root/                      0700, the node's own
      instances/<h(study)>/<h(sop)>.dcm     0600; h(x) = sha256(x)[:32]
      outbox/, audit-salt      drafts and the audit salt (node/outbox.py, node/audit.py)

Decisions:
- Durable write: a temp file in the study's folder (`.<h(sop)>.<pid>-<n>.tmp`), written, fsync'ed,
  renamed over the final name, then the folder fsync'ed (and `instances/` when the study folder is
  new), all before `put` returns: a kill -9 or power cut after the acknowledgement finds the file.
- Duplicates, by SOP Instance UID: the same bytes again return the stored Instance (nothing
  written, `put_new` says it was not new). Different bytes under a stored SOP UID replace it: the
  newer copy wins (a modality resending a corrected object; Orthanc does so with OverwriteInstances).
- Full: a put that would take the spool past `max_bytes` raises SpoolFull and deletes nothing
  (so does a disk out of space). Only `prune` and `remove_study` delete, and only files of this
  layout that the index holds.
- Prune policy (`prune`, called by the node from time to time): first every study whose newest
  instance is older than `max_age_days`, then, while the spool holds more than PRUNE_TO of
  `max_bytes`, the studies received longest ago; a `pinned` study (being prepared or asked
  about) is never pruned.
- `scan` (at start) rebuilds the index from the files: leftover temp files of a write cut short
  are removed; a file that does not read as DICOM with its UIDs, or whose name does not match
  them, is left alone (not ours to delete) and not indexed. One process owns a spool folder.
  Threads: the first call of any method scans once (the others wait for it); a scan waits for
  the writes under way and holds new ones back, so it never takes a temp file being written nor
  misses an instance stored while it lists the folders.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import logging
import os
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from medgemma_edge.runtime.dicom.read import Source, quiet_pydicom, read, tag
from medgemma_edge.runtime.errors import InputError, MedGemmaEdgeError
from medgemma_edge.runtime.files import MAX_FILE_BYTES

LOG = logging.getLogger("medgemma_edge.node.spool")

PRUNE_TO = 0.9  # the size pass of prune stops once the spool holds at most this share of max_bytes
# UIDs are digits and dots (PS3.5 9.1); real archives hold a few with other URL-safe characters.
# They are only hashed and compared here, and later appear in URLs (medgemma-edge:study/UID).
_UID = re.compile(r"[0-9A-Za-z._-]{1,64}")
_MODALITY = re.compile(r"[A-Z0-9_ ]{1,16}")
_NAME = re.compile(r"[0-9a-f]{32}")
_SOURCE = "received instance"  # how read() errors name the bytes: never a value from them
_read_lock = threading.Lock()


class SpoolFull(MedGemmaEdgeError):
    """The spool would pass its size limit (or the disk is full); nothing was written or deleted."""


@dataclass(frozen=True)
class Instance:
    path: Path
    sop_uid: str
    sop_class: str
    study_uid: str
    series_uid: str
    modality: str | None
    series_number: int | None
    instance_number: int | None
    size: int
    sha256: str
    received: float  # time.time() of the write (the file's mtime)


def hashed(uid: str) -> str:
    """A file or folder name for a UID: no UID on disk in the clear."""
    return hashlib.sha256(uid.encode("ascii")).hexdigest()[:32]


class Spool:
    def __init__(self, root: Path, max_bytes: int, *, max_age_days: float = 30.0):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.max_age_s = float(max_age_days) * 86400.0
        self.folder = self.root / "instances"
        _own_folder(self.root)
        _own_folder(self.folder)
        self._lock = threading.Condition()
        self._by_sop: dict[str, Instance] = {}
        self._by_study: dict[str, dict[str, Instance]] = {}
        self._used = 0
        self._reserved = 0  # bytes of writes under way, counted against max_bytes
        self._writing: set[str] = set()  # SOP UIDs being written: a second put of one waits
        self._pins: Counter[str] = Counter()
        self._scanned = False
        self._scanning = False  # a scan is listing the folders: puts wait (module docstring)
        self._tmp_names = itertools.count()

    # -- reading the index -----------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        self._ensure_scanned()
        with self._lock:
            return self._used

    def studies(self) -> list[str]:
        """Study UIDs, first received first."""
        self._ensure_scanned()
        with self._lock:
            first = {uid: min(i.received for i in insts.values()) for uid, insts in self._by_study.items()}
        return sorted(first, key=lambda uid: (first[uid], uid))

    def instances(self, study_uid: str) -> list[Instance]:
        """The study's instances by series, then InstanceNumber (missing last), then SOP UID."""
        self._ensure_scanned()
        with self._lock:
            found = list(self._by_study.get(study_uid, {}).values())
        return sorted(found, key=lambda i: (i.series_uid, i.instance_number is None,
                                            i.instance_number or 0, i.sop_uid))

    def get(self, sop_uid: str) -> Instance | None:
        self._ensure_scanned()
        with self._lock:
            return self._by_sop.get(sop_uid)

    # -- storing ---------------------------------------------------------------------------------
    def put(self, data: bytes) -> Instance:
        """Store one instance (DICOM file bytes) durably; see the module docstring."""
        return self.put_new(data)[0]

    def put_new(self, data: bytes) -> tuple[Instance, bool]:
        """(the stored Instance, whether anything was written): False for the same bytes again."""
        self._ensure_scanned()
        if len(data) > MAX_FILE_BYTES:
            raise InputError(f"the instance is {len(data):,} bytes, over the {MAX_FILE_BYTES:,}-byte "
                             "limit the runtime reads")
        fields = _header_fields(data)
        sop, study = fields["sop_uid"], fields["study_uid"]
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            while self._scanning or sop in self._writing:
                self._lock.wait()
            old = self._by_sop.get(sop)
            if old is not None and old.sha256 == digest:
                return old, False
            grows = len(data) - (old.size if old is not None else 0)
            if self._used + self._reserved + grows > self.max_bytes:
                raise SpoolFull(f"the spool is full ({self._used / 2**30:.2f} of {self.max_bytes / 2**30:.2f} GB "
                                "used) — raise --spool-gb, or free room (studies older than the age limit "
                                "are pruned)")
            self._writing.add(sop)
            self._reserved += max(grows, 0)
        try:
            path = self.folder / hashed(study) / f"{hashed(sop)}.dcm"
            received = self._write(path, data)
            inst = Instance(path=path, size=len(data), sha256=digest, received=received, **fields)
            with self._lock:
                self._index(inst)
            if old is not None and old.path != path:  # the same SOP UID filed under another study
                _unlink_synced(old.path)
            return inst, True
        finally:
            with self._lock:
                self._writing.discard(sop)
                self._reserved -= max(grows, 0)
                self._lock.notify_all()

    def _write(self, path: Path, data: bytes) -> float:
        """tmp → write → fsync → rename → fsync the folder; the file's mtime."""
        folder = path.parent
        tmp = folder / f".{path.stem}.{os.getpid()}-{next(self._tmp_names)}.tmp"
        try:
            fd = self._create(tmp)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
                received = os.fstat(fd).st_mtime
            finally:
                os.close(fd)
            os.replace(tmp, path)
            _fsync_dir(folder)
        except OSError as err:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFull("the disk holding the spool is full — free space or move --spool") from None
            raise
        return received

    def _create(self, tmp: Path) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        for attempt in range(3):  # remove_study may take an emptied study folder between the two
            if not tmp.parent.is_dir():
                with contextlib.suppress(FileExistsError):
                    tmp.parent.mkdir(mode=0o700)
                _fsync_dir(self.folder)  # the new study folder's entry is durable too
            try:
                return os.open(tmp, flags, 0o600)
            except FileNotFoundError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _index(self, inst: Instance) -> None:
        old = self._by_sop.get(inst.sop_uid)
        if old is not None:
            self._used -= old.size
            self._by_study.get(old.study_uid, {}).pop(old.sop_uid, None)
            if not self._by_study.get(old.study_uid):
                self._by_study.pop(old.study_uid, None)
        self._by_sop[inst.sop_uid] = inst
        self._by_study.setdefault(inst.study_uid, {})[inst.sop_uid] = inst
        self._used += inst.size

    # -- start -----------------------------------------------------------------------------------
    def scan(self) -> list[Instance]:
        """Rebuild the index from the files (at start); every complete instance, in study order."""
        self._scan_alone(only_if_needed=False)
        return [i for uid in self.studies() for i in self.instances(uid)]

    def _scan_alone(self, *, only_if_needed: bool) -> None:
        """Scan once no other scan and no write is under way, holding new writes back meanwhile."""
        with self._lock:
            while self._scanning:
                self._lock.wait()
            if only_if_needed and self._scanned:
                return
            self._scanning = True
            while self._writing:
                self._lock.wait()
        try:
            self._scan()
        finally:
            with self._lock:
                self._scanning = False
                self._lock.notify_all()

    def _scan(self) -> None:
        found: list[Instance] = []
        unreadable = 0
        for folder in sorted(p for p in self.folder.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)):
            for path in sorted(folder.iterdir()):
                if path.name.startswith(".") and path.name.endswith(".tmp"):
                    with contextlib.suppress(OSError):  # a write cut short: never acknowledged
                        path.unlink()
                    continue
                if not (path.suffix == ".dcm" and _NAME.fullmatch(path.stem) and path.is_file()):
                    continue
                inst = _scanned(path)
                if inst is None:
                    unreadable += 1
                else:
                    found.append(inst)
        newest: dict[str, Instance] = {}
        for inst in sorted(found, key=lambda i: i.received):
            if inst.sop_uid in newest:  # replaced under another study, cut before the old file went
                _unlink_synced(newest[inst.sop_uid].path)
            newest[inst.sop_uid] = inst
        with self._lock:
            self._by_sop.clear()
            self._by_study.clear()
            self._used = 0
            for inst in newest.values():
                self._index(inst)
            self._scanned = True
        if unreadable:
            LOG.warning("spool: %d files in %s are not instances of this spool; left alone",
                        unreadable, self.folder)

    def _ensure_scanned(self) -> None:
        if not self._scanned:
            self._scan_alone(only_if_needed=True)

    # -- deleting --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def pinned(self, study_uid: str):
        """While inside, `prune` leaves the study alone (it is being prepared or asked about)."""
        with self._lock:
            self._pins[study_uid] += 1
        try:
            yield
        finally:
            with self._lock:
                self._pins[study_uid] -= 1
                if self._pins[study_uid] <= 0:
                    del self._pins[study_uid]

    def is_pinned(self, study_uid: str) -> bool:
        with self._lock:
            return self._pins.get(study_uid, 0) > 0

    def remove_study(self, study_uid: str) -> int:
        """Delete the study's files (only those the index holds); how many were deleted."""
        self._ensure_scanned()
        with self._lock:
            insts = list(self._by_study.pop(study_uid, {}).values())
            for inst in insts:
                self._by_sop.pop(inst.sop_uid, None)
                self._used -= inst.size
        folders = set()
        removed = 0
        for inst in insts:
            with contextlib.suppress(FileNotFoundError):
                inst.path.unlink()
                removed += 1
            folders.add(inst.path.parent)
        for folder in folders:
            _fsync_dir(folder)
            with contextlib.suppress(OSError):  # not empty: a write under way, or not ours
                folder.rmdir()
        if folders:
            _fsync_dir(self.folder)
        return removed

    def prune(self, now: float | None = None) -> list[str]:
        """Apply the age, then size policy (module docstring); the study UIDs removed."""
        self._ensure_scanned()
        now = time.time() if now is None else now
        with self._lock:
            newest = {uid: max(i.received for i in insts.values()) for uid, insts in self._by_study.items()}
            sizes = {uid: sum(i.size for i in insts.values()) for uid, insts in self._by_study.items()}
            pins = set(self._pins)
            used = self._used
        removed = []
        for uid in sorted(newest, key=lambda u: newest[u]):  # oldest first
            if uid in pins:
                continue
            if now - newest[uid] > self.max_age_s or used > PRUNE_TO * self.max_bytes:
                self.remove_study(uid)
                used -= sizes[uid]
                removed.append(uid)
        if removed:
            LOG.info("spool: pruned %d studies (age over %g days or spool over %d %% full)",
                     len(removed), self.max_age_s / 86400, round(PRUNE_TO * 100))
        return removed


# ---------------------------------------------------------------------------------------------

def _header_fields(data: bytes, name: str = _SOURCE) -> dict:
    """The index fields from a header (pixels not read); InputError, one line, without values."""
    source = Source(name=name, data=data)
    # quiet_pydicom's warnings filter is process-wide and not thread-safe (warnings.catch_warnings):
    # concurrent associations read headers one at a time, so none restores it under another's read.
    with _read_lock, quiet_pydicom():
        ds = read(source, header_only=True)
        return _fields(ds, source, name)


def _fields(ds, source: Source, name: str) -> dict:
    meta = getattr(ds, "file_meta", None) or {}
    uids = {}
    for field, keyword, fallback in (("sop_uid", "SOPInstanceUID", "MediaStorageSOPInstanceUID"),
                                     ("sop_class", "SOPClassUID", "MediaStorageSOPClassUID"),
                                     ("study_uid", "StudyInstanceUID", None),
                                     ("series_uid", "SeriesInstanceUID", None)):
        value = tag(ds, keyword, source, str, None, strict=False)
        if value is None and fallback:
            value = str(meta.get(fallback, "") or "") or None
        value = value.strip("\0 ") if value else value
        if not value or not _UID.fullmatch(value):
            raise InputError(f"{name}: {keyword} is missing or not a UID — the sender must send "
                             "complete DICOM objects")
        uids[field] = value
    modality = tag(ds, "Modality", source, lambda v: str(v).strip().upper(), None, strict=False)
    return dict(uids, modality=modality if modality and _MODALITY.fullmatch(modality) else None,
                series_number=tag(ds, "SeriesNumber", source, int, None, strict=False),
                instance_number=tag(ds, "InstanceNumber", source, int, None, strict=False))


def _scanned(path: Path) -> Instance | None:
    """The Instance a spool file holds; None when it is not one this spool wrote."""
    try:
        data = path.read_bytes()
        fields = _header_fields(data, name="spool file")
        received = path.stat().st_mtime
    except (OSError, InputError):
        return None
    if path.stem != hashed(fields["sop_uid"]) or path.parent.name != hashed(fields["study_uid"]):
        return None
    return Instance(path=path, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                    received=received, **fields)


def _own_folder(folder: Path) -> None:
    """Make `folder` (0700) or check an existing one is this user's, then keep it owner-only."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = folder.lstat()
    except OSError as err:
        raise InputError(f"cannot make the spool folder {folder} ({err.strerror or type(err).__name__}) — "
                         "pass --spool DIR on a writable disk") from None
    if not os.path.isdir(folder) or folder.is_symlink():
        raise InputError(f"the spool path {folder} is not a folder — pass --spool DIR")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise InputError(f"the spool folder {folder} belongs to another user — pass --spool DIR of your own")
    if st.st_mode & 0o077:
        os.chmod(folder, 0o700)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_synced(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    with contextlib.suppress(OSError):
        _fsync_dir(path.parent)
