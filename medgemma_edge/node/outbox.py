"""Drafts waiting to go back into the PACS: persisted first, sent by one thread, retried, never
silently dropped.

- `submit(ds)` writes the draft to `folder/<id>.dcm` (owner-only, temp file → fsync → rename →
  fsync of the folder) before it returns the id, so an accepted draft survives a crash.
- One sender thread sends drafts in submission order: DIMSE C-STORE to `results_to` when it is
  given (the user named a peer for results), else STOW-RS to the `dicomweb` server. A failed send
  is retried after `backoff_s`, doubling, up to `attempts` sends; then the draft is `failed`, with
  one log line saying why and where its file is. The file stays.
- A sent draft's file is deleted: the PACS holds it now (the node deletes only its own files).
  Every `.dcm` left in the folder is a draft not known to be sent, so a new Outbox on the folder
  (a restart) queues them all again, including ones that had failed: restarting the node after
  fixing the PACS is how a failed draft is retried. Leftover temp files are drafts that were never
  accepted (submit had not returned) and are removed.
- `status(id)` → {"id", "state": queued|sending|sent|failed, "attempts", "error"}; None for an id
  this Outbox does not know (sent before a restart, or never submitted).
- `on_event(name, draft)`, names "queued", "retry", "sent", "failed", is called on the sender thread
  (or submit's caller for "queued") outside the lock; `draft.study_uid` is there for the audit's
  salted hash. The node wires "sent"/"failed" to the audit's result_stored event.

File names are random ids; no UID or patient value reaches a name, an error or a log line.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from medgemma_edge.runtime.dicom import offline  # noqa: F401 — before pydicom (see offline.py)

import pydicom

from medgemma_edge.node.spool import _fsync_dir, _own_folder, _unlink_synced
from medgemma_edge.runtime.dicom.read import Source, quiet_pydicom, read
from medgemma_edge.runtime.errors import InputError, MedGemmaEdgeError

log = logging.getLogger(__name__)

ATTEMPTS = 6  # sends per draft before it is reported failed (with the backoff: about a minute)
BACKOFF_S = 2.0  # wait before the first retry; doubled after each failure
TIMEOUT_S = 30.0  # one association / HTTP request; also bounds how long stop() can wait on a send
STORED = {0x0000, 0xB000, 0xB006, 0xB007}  # C-STORE success and its warnings (instance stored)
_SUFFIX, _TMP = ".dcm", ".tmp"


@dataclass
class Draft:
    id: str
    path: Path
    study_uid: str | None  # for the audit's salted hash only; never logged
    state: str = "queued"  # queued | sending | sent | failed
    attempts: int = 0
    error: str | None = None
    due: float = field(default=0.0, repr=False)  # monotonic time of the next send

    def status(self) -> dict:
        return {"id": self.id, "state": self.state, "attempts": self.attempts, "error": self.error}


class Outbox:
    def __init__(self, folder: Path, results_to, dicomweb: str | None, ae_title: str, on_event=None,
                 *, attempts: int = ATTEMPTS, backoff_s: float = BACKOFF_S, timeout_s: float = TIMEOUT_S):
        if results_to is None and not dicomweb:
            raise InputError("drafts need somewhere to go — give --results-to AE@HOST:PORT or --dicomweb URL")
        self.folder = Path(folder)
        self.results_to, self.dicomweb, self.ae_title = results_to, dicomweb, ae_title
        self.on_event = on_event
        self.attempts, self.backoff_s, self.timeout_s = attempts, backoff_s, timeout_s
        self._cond = threading.Condition()
        self._drafts: dict[str, Draft] = {}
        self._order: list[str] = []  # queued ids, oldest first
        self._run_id = 0  # stop() moves it on: a sender whose id is past has to end
        self._thread: threading.Thread | None = None
        self._assoc = None  # the association in flight, aborted by stop()
        _own_folder(self.folder)
        self._requeue()

    @property
    def destination(self) -> str:
        return str(self.results_to) if self.results_to is not None else f"STOW-RS {self.dicomweb}"

    # -- the caller's side ----------------------------------------------------------------------
    def submit(self, ds) -> str:
        """Persist the draft (durably, before returning) and queue it; its id."""
        draft_id = uuid.uuid4().hex
        path = self.folder / f"{draft_id}{_SUFFIX}"
        _write_private(path, _encoded(ds))
        draft = Draft(draft_id, path, str(ds.get("StudyInstanceUID", "")) or None)
        with self._cond:
            self._drafts[draft_id] = draft
            self._order.append(draft_id)
            self._cond.notify_all()
        self._emit("queued", draft)
        return draft_id

    def status(self, draft_id: str) -> dict | None:
        with self._cond:
            draft = self._drafts.get(draft_id)
            return draft.status() if draft is not None else None

    def start(self) -> "Outbox":
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, args=(self._run_id,),
                                                name="node-outbox", daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """End the sender thread promptly: a send in flight is aborted (DIMSE) or bounded by the
        request timeout (STOW-RS); its draft stays queued on disk for the next start."""
        with self._cond:
            self._run_id += 1
            assoc, thread, self._thread = self._assoc, self._thread, None
            self._cond.notify_all()
        if assoc is not None:
            try:
                assoc.abort()
            except Exception:  # already ended: nothing to abort
                pass
        if thread is not None:
            thread.join(timeout)

    # -- the sender thread ----------------------------------------------------------------------
    def _run(self, run_id: int) -> None:
        while True:
            with self._cond:
                draft = self._next(run_id)
                if draft is None:
                    return
                draft.state, draft.attempts = "sending", draft.attempts + 1
            error = self._send(draft)
            with self._cond:
                if error is None:
                    draft.state, draft.error = "sent", None
                    event = "sent"
                elif run_id != self._run_id:  # aborted by stop(): not the PACS's fault, not an attempt
                    draft.state, draft.attempts = "queued", draft.attempts - 1
                    self._order.insert(0, draft.id)
                    event = None
                elif draft.attempts < self.attempts:
                    draft.state, draft.error = "queued", error
                    draft.due = time.monotonic() + self.backoff_s * 2 ** (draft.attempts - 1)
                    self._order.append(draft.id)
                    event = "retry"
                else:
                    draft.state, draft.error = "failed", error
                    event = "failed"
            if event == "sent":
                _unlink_synced(draft.path)
            elif event == "failed":
                log.warning("draft %s not stored after %d attempts: %s (kept in %s; restart the "
                            "node to send it again)", draft.id, draft.attempts, error, draft.path)
            if event is not None:
                self._emit(event, draft)

    def _next(self, run_id: int) -> Draft | None:
        """The oldest queued draft that is due, waiting for one; None once stopped."""
        while run_id == self._run_id:
            now = time.monotonic()
            due = [self._drafts[i] for i in self._order]
            ready = next((d for d in due if d.due <= now), None)
            if ready is not None:
                self._order.remove(ready.id)
                return ready
            self._cond.wait(min((d.due for d in due), default=now + 3600) - now)
        return None

    def _send(self, draft: Draft) -> str | None:
        """None when the PACS stored the draft, else one line saying why not."""
        try:
            with quiet_pydicom():
                ds = pydicom.dcmread(draft.path)
        except Exception as err:
            return f"the draft file cannot be read ({type(err).__name__})"
        try:
            if self.results_to is not None:
                return self._c_store(ds)
            return self._stow(ds)
        except Exception as err:  # a library failure must not end the thread or lose the draft
            return f"{self.destination}: {type(err).__name__}"

    def _c_store(self, ds) -> str | None:
        from pynetdicom import AE
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

        peer = self.results_to
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.connection_timeout = self.timeout_s
        ae.add_requested_context(ds.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate(peer.host, peer.port or 104, ae_title=peer.ae)
        with self._cond:
            self._assoc = assoc
        try:
            if assoc.is_rejected:
                return f"{peer}: association rejected (is our AE title {self.ae_title} allowed there?)"
            if not assoc.is_established:
                return f"{peer}: cannot connect (no DICOM service answered)"
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None:
                return f"{peer}: no C-STORE response (connection lost or timed out)"
            if code not in STORED:
                return f"{peer}: C-STORE refused (status 0x{code:04X})"
            return None
        finally:
            with self._cond:
                self._assoc = None
            if assoc.is_established:
                assoc.release()

    def _stow(self, ds) -> str | None:
        import requests
        from dicomweb_client import DICOMwebClient

        url = self.dicomweb.rstrip("/")
        # The Outbox retries; dicomweb_client's own retrying (five tries with waits) would hide
        # failures for a minute, and its `retrying` logs a multi-line traceback per failed try.
        logging.getLogger("retrying").setLevel(logging.ERROR)
        client = DICOMwebClient(url=url, timeout=self.timeout_s)
        client.set_http_retry_params(retry=False)
        try:
            answer = client.store_instances([ds])
        except requests.exceptions.HTTPError as err:
            code = err.response.status_code if err.response is not None else "?"
            return f"STOW-RS {url}: HTTP {code}"
        except requests.exceptions.Timeout:
            return f"STOW-RS {url}: no answer in {self.timeout_s:g} s"
        except requests.exceptions.ConnectionError:
            return f"STOW-RS {url}: cannot connect"
        failed = answer.get("FailedSOPSequence") or []
        if failed:
            reason = failed[0].get("FailureReason")
            return f"STOW-RS {url}: the server refused the draft (failure reason {reason})"
        return None

    # -- restart --------------------------------------------------------------------------------
    def _requeue(self) -> None:
        """Queue every draft file left in the folder, oldest first; remove unaccepted temp files."""
        found = []
        for entry in os.scandir(self.folder):
            if entry.name.endswith(_TMP):
                _unlink_synced(Path(entry.path))
            elif entry.name.endswith(_SUFFIX) and entry.is_file(follow_symlinks=False):
                found.append((entry.stat().st_mtime, entry.name[:-len(_SUFFIX)], Path(entry.path)))
        for _, draft_id, path in sorted(found):
            self._drafts[draft_id] = Draft(draft_id, path, _study_of(path))
            self._order.append(draft_id)

    def _emit(self, name: str, draft: Draft) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(name, draft)
        except Exception as err:  # the audit failing must not stop the drafts
            log.warning("outbox event %s for draft %s: its handler failed (%s)", name, draft.id,
                        type(err).__name__)


def _study_of(path: Path) -> str | None:
    try:
        with quiet_pydicom():
            return str(read(Source(name=path.name, path=path), header_only=True).StudyInstanceUID)
    except (MedGemmaEdgeError, AttributeError):
        return None  # still queued: the PACS decides whether it takes the file


def _encoded(ds) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    with quiet_pydicom():
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _write_private(path: Path, data: bytes) -> None:
    """`data` at `path`, owner-only, durable before returning: temp file, fsync, rename, fsync of
    the folder (so the rename itself survives a crash)."""
    tmp = path.with_name(path.name + _TMP)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_synced(tmp)
        raise
    _fsync_dir(path.parent)
