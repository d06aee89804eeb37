"""The node's audit trail (`serve --audit-log FILE`): one JSON line per event, no patient values.

A line: {"time": UTC ISO 8601, "event", "key": key id, "study": salted sha256 of the study UID or
null, "model": the bundle's sha256 or null, "outcome"}. Each line is appended, flushed and fsynced
before `event` returns (events are rare: a study, a question, a draft), so a line written is a line
kept across a crash. The file is created owner-only (0600).

Why salted: a study UID is the same in every system that holds the study, so its plain hash could
be looked up by anyone with the PACS; salted, the hash only links this node's own lines to each
other. The salt is 32 random bytes made at first use, in a 0600 file beside the spool
(`root/audit-salt`); losing it only breaks the link between old and new lines.

Key id: the first 12 hex characters of the API key's sha256 (or "none" without a key), never the key.
Unsalted on purpose, so an administrator can tell whose key it was (`key_id(KEY)`); 48 bits of a
hash say nothing useful about a random key.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
import threading
from pathlib import Path

from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.files import shown

EVENTS = ("study_received", "study_prepared", "asked", "result_stored", "association_refused")
SALT_BYTES = 32
_OUTCOME_CHARS = 200  # one short line: "ok", "failed: <one-line reason>"


def key_id(api_key: str | None) -> str:
    """What the audit writes for an API key: a short hash, or "none"."""
    if not api_key:
        return "none"
    return hashlib.sha256(api_key.encode()).hexdigest()[:12]


class AuditLog:
    """Thread-safe; with `path` None every event is dropped (no file, no salt made)."""

    def __init__(self, path: Path | None, salt_file: Path):
        self.path, self.salt_file = (Path(path) if path is not None else None), Path(salt_file)
        self._lock = threading.Lock()
        self._fh = None
        self._salt: bytes | None = None

    def event(self, name: str, *, key_id: str | None = None, study_uid: str | None = None,
              model_sha: str | None = None, outcome: str = "ok") -> dict | None:
        """Write one line; the record written (None without a log file)."""
        if name not in EVENTS:
            raise ValueError(f"unknown audit event {name!r}; one of {', '.join(EVENTS)}")
        if self.path is None:
            return None
        with self._lock:
            record = {
                "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
                "event": name, "key": key_id or "none",
                "study": self._study_hash(study_uid) if study_uid else None,
                "model": model_sha, "outcome": " ".join(str(outcome).split())[:_OUTCOME_CHARS],
            }
            fh = self._file()
            fh.write(json.dumps(record, ensure_ascii=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return record

    def study_hash(self, study_uid: str) -> str:
        """The salted hash the audit writes for a study UID (to find a study's lines)."""
        with self._lock:
            return self._study_hash(study_uid)

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    # -- under the lock ---------------------------------------------------------------------------
    def _study_hash(self, study_uid: str) -> str:
        return hashlib.sha256(self._salt_bytes() + str(study_uid).encode()).hexdigest()

    def _file(self):
        if self._fh is None:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            if os.fstat(fd).st_uid == os.getuid():
                os.fchmod(fd, 0o600)  # an older file made with a wider mode is closed to others
            self._fh = os.fdopen(fd, "a", encoding="utf-8")
        return self._fh

    def _salt_bytes(self) -> bytes:
        if self._salt is None:
            self._salt = _load_salt(self.salt_file)
        return self._salt


def _load_salt(path: Path) -> bytes:
    """The salt in `path`, made (0600, exclusively, fsynced) when there is none."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        try:
            salt = bytes.fromhex(path.read_text().strip())
        except (ValueError, UnicodeDecodeError):
            salt = b""
        if len(salt) < SALT_BYTES // 2:
            raise InputError(f"{shown(path)}: the audit salt is damaged (too short or not hex) — "
                             "delete the file; a new salt is made at the next event") from None
        return salt
    salt = secrets.token_bytes(SALT_BYTES)
    with os.fdopen(fd, "w") as fh:
        fh.write(salt.hex() + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return salt
