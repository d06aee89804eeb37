"""The DICOM node: listener → spool → book of studies → background preparation → worklist, and
drafts back to the PACS. One per `serve --dicom-port`, sharing the server's model and worker.

    node = Node(config, state)   # state: the server's ServerState (worker, backend)
    node.start() … node.stop()

At start the spool is read again (studies received before a restart wait `stable_s` once the model
is ready, then are prepared; one prepared before is found in the image cache and only decoded), then the listener
opens. A timer thread moves quiet studies on (StudyBook.due → Preparer.submit) once the model is
loaded, and applies the spool's prune policy from time to time. The server asks the node for a
study's chat items (`study_items`), pulls a study it lacks from --dicomweb (`pull`), and stores
drafts (`store_result`). Errors a client can act on are InputError, one line, no patient value.
"""

from __future__ import annotations

import logging
import threading

from medgemma_edge.node.audit import AuditLog
from medgemma_edge.node.config import NodeConfig
from medgemma_edge.node.prepare import Preparer
from medgemma_edge.node.spool import Spool
from medgemma_edge.node.studies import StudyBook
from medgemma_edge.runtime.errors import InputError

log = logging.getLogger("medgemma_edge.node")
PRUNE_EVERY_S = 600.0  # how often the spool's age/size policy runs


class Node:
    def __init__(self, config: NodeConfig, state=None):
        self.config = config.check()
        self.state = state
        root = config.spool_dir
        self.spool = Spool(root, config.spool_bytes, max_age_days=config.max_age_days)
        self.book = StudyBook(config.stable_s)
        self.audit = AuditLog(config.audit_log, root / "audit-salt")
        self.outbox = None
        if config.results_to is not None or config.dicomweb:
            from medgemma_edge.node.outbox import Outbox

            self.outbox = Outbox(root / "outbox", config.results_to, config.dicomweb, config.ae_title,
                                 on_event=self._draft_event)
        self.listener = None
        self.preparer = Preparer(self)
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        self._model_sha: str | None = None
        self._waiting: list[str] = []  # quiet studies, prepared in turn
        self._ready_at: float | None = None  # when the model was first seen loaded (book clock)

    # -- life ------------------------------------------------------------------------------------
    def start(self) -> "Node":
        from medgemma_edge.node.scp import DicomListener

        for inst in self.spool.scan():
            self.book.add(inst)
        self.listener = DicomListener(self.config, self.spool, self.received, on_refused=self._refused).start()
        if self.outbox is not None:
            self.outbox.start()
        self._stop.clear()
        self._timer = threading.Thread(target=self._tick_loop, name="node-timer", daemon=True)
        self._timer.start()
        log.info("DICOM node %s listening on %s:%s", self.config.ae_title, self.config.host, self.listener.port)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.join(10)
            self._timer = None
        if self.listener is not None:
            self.listener.stop()
        if self.outbox is not None:
            self.outbox.stop()
        self.audit.close()

    @property
    def port(self) -> int:
        return self.listener.port if self.listener is not None else self.config.port

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # -- what arrives ------------------------------------------------------------------------------
    def received(self, inst) -> None:
        """The listener stored an instance (called after its status is decided: noting only)."""
        self.book.add(inst)

    def _refused(self, calling_ae: str, reason: str) -> None:
        self.event("association_refused", None, outcome=f"refused: {reason}")

    def tick(self) -> None:
        """Move quiet studies on once the model is there: queued, and prepared (--prepare auto).
        While the model loads nothing moves, and quiet time counts from when it is ready: studies
        re-read from the spool after a restart wait for a modality's resend instead of being
        prepared half-received."""
        if not (self.state is None or self.state.backend is not None):
            return
        if self._ready_at is None:
            self._ready_at = self.book.clock()
        for uid in self.book.due(not_before=self._ready_at):
            study = self.book.study(uid)
            self.event("study_received", uid, outcome=f"ok: {len(study.instances) if study else 0} instances")
            if self.config.prepare == "auto":
                self._waiting.append(uid)
        while self._waiting:
            uid = self._waiting.pop(0)
            study = self.book.study(uid)
            if study is not None and study.state == "queued":  # not grown or answered meanwhile
                self.preparer.submit(uid)

    def _tick_loop(self) -> None:
        every = max(0.05, min(1.0, self.config.stable_s / 4))
        since_prune = PRUNE_EVERY_S
        while not self._stop.wait(every):
            try:
                self.tick()
                since_prune += every
                if since_prune >= PRUNE_EVERY_S:
                    since_prune = 0.0
                    for uid in self.spool.prune():
                        self.book.remove(uid)
            except Exception as err:  # the node keeps running; the type names the failure
                log.error("node timer: %s", type(err).__name__)

    # -- asking about a study ----------------------------------------------------------------------
    def study_source(self, uid: str | None, series_uid: str | None = None) -> list[dict]:
        """Chat content items (one image item per readable series, or the one series named) of a
        study this node holds; InputError, one line, when it cannot be asked about."""
        return self.study_items(uid, series_uid)[1]

    def study_items(self, uid: str | None, series_uid: str | None = None) -> tuple[str, list[dict]]:
        """(study UID, content items) for a study (by uid) or one series (by series_uid)."""
        study = self.book.study(uid) if uid is not None else self._study_of_series(series_uid)
        what = "study" if series_uid is None else "series"
        if study is None:
            hint = " (or pull it: this node's --dicomweb does not have it either)" if self.config.dicomweb else ""
            raise InputError(f"no {what} with this UID on this node — send it to AE {self.config.ae_title} "
                             f"(port {self.port}) first{hint}; GET /v1/studies lists what it holds")
        if study.state == "receiving":
            raise InputError(f"the {what} is still arriving from the PACS — ask again once its instances stop "
                             f"coming ({self.config.stable_s:g} s after the last one)")
        if study.state == "failed":
            raise InputError(f"the {what} could not be prepared: {study.why}")
        self.book.classify(study)
        if series_uid is not None:
            series = study.find_series(series_uid)
            if not series.readable:
                raise InputError(f"the model does not read this series: it is {series.skipped}")
            chosen = [series]
        else:
            chosen = study.readable_series()
        return study.uid, [{"type": "image", "image": s.source()} for s in chosen]

    def _study_of_series(self, series_uid):
        return next((s for s in self.book.studies() if s.find_series(series_uid) is not None), None)

    def knows(self, uid: str, series: bool = False) -> bool:
        return (self._study_of_series(uid) if series else self.book.study(uid)) is not None

    def pull(self, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None) -> list:
        """Fetch a study (or one series or instance) from --dicomweb into the spool; it is then
        queued at once (it arrived whole). Blocking: call it off the event loop."""
        from medgemma_edge.node.dicomweb import fetch_study

        with self.spool.pinned(study_uid):
            instances = fetch_study(self.config.dicomweb, study_uid, self.spool, series_uid=series_uid,
                                    sop_uid=sop_uid)
        for inst in instances:
            self.book.add(inst)
        self.book.settle(study_uid)
        self.event("study_received", study_uid, outcome=f"pulled: {len(instances)} instances")
        if self.config.prepare == "auto":
            self.preparer.submit(study_uid)
        return instances

    def answered(self, study_uid: str) -> None:
        """A question about the study was answered: its prefix is saved now (the answer saved it)."""
        study = self.book.study(study_uid)
        if study is not None and study.state == "queued" and self.config.prepare == "off":
            self.book.set_state(study_uid, "ready")

    # -- drafts ----------------------------------------------------------------------------------
    def store_result(self, question: str, answer: str, study_uid: str, *, model_name: str, model) -> dict:
        """The answer as an unverified SR draft, queued for the PACS; the draft's status."""
        from medgemma_edge import __version__
        from medgemma_edge.node.results import draft_sr

        if self.outbox is None:
            raise InputError("this node sends drafts nowhere — start `serve` with --results-to AE@HOST:PORT "
                             "or --dicomweb URL")
        study = self.book.study(study_uid)
        if study is None:
            raise InputError("the study of this answer is no longer on this node (the spool pruned it)")
        references = [inst for s in study.readable_series() for inst in s.instances]
        ds = draft_sr(question, answer, references=references, model_name=model_name,
                      bundle_sha256=self.model_sha(model) or "unknown", software_version=__version__)
        return self.outbox.status(self.outbox.submit(ds))

    def result_status(self, draft_id: str) -> dict | None:
        return self.outbox.status(draft_id) if self.outbox is not None else None

    def _draft_event(self, name: str, draft) -> None:
        if name in ("sent", "failed"):
            self.event("result_stored", draft.study_uid, outcome="ok" if name == "sent" else
                       f"failed: {draft.error}")

    # -- audit -----------------------------------------------------------------------------------
    def model_sha(self, model=None) -> str | None:
        """The sha256 of the bundle's manifest (which pins every file's sha256), once known."""
        if self._model_sha is None:
            model = model or getattr(getattr(self.state, "backend", None), "model", None)
            try:
                self._model_sha = model.manifest_sha256
            except (OSError, AttributeError):
                return None
        return self._model_sha

    def event(self, name: str, study_uid: str | None, *, key_id: str | None = None, outcome: str = "ok") -> None:
        try:
            self.audit.event(name, key_id=key_id, study_uid=study_uid, model_sha=self.model_sha(), outcome=outcome)
        except Exception as err:  # an audit that cannot be written is said once per event, never fatal
            log.error("audit log: cannot write %s (%s)", name, type(err).__name__)
