"""Background preparation: a quiet study's images are encoded and its prompt prefix evaluated and
saved on the model worker's background lane, so the first question about it starts at the text.

One study is one background task: `Model.prepare_steps(study_messages(study), …)` run one step at
a time by `Worker.submit_steps` (server/worker.py), which runs a step only when no interactive
request waits, so a question waits at most one image encode (or one image block's evaluation).
The steps say how far it got ("preparing i of n"); the end is `ready`, or `failed` with one line
(InputError, BundleError: a bad file, an unsupported series; anything else: a generic line, the
type name logged). The node keeps running either way, and a failed study is prepared again when
a new instance of it arrives.

Decided here: a study with no series the model reads (only reports, localizers, …) fails with the
reasons; while a study prepares, the spool keeps its files (`Spool.pinned`); the options are the
server's defaults for a chat naming the study (no window, fit or think; max_slices from the node's
config), so a question from the server or the kiosk hits the saved prefix.
"""

from __future__ import annotations

import contextlib
import logging
import os

from medgemma_edge.node.studies import study_messages
from medgemma_edge.runtime.errors import BundleError, InputError

log = logging.getLogger("medgemma_edge.node")
INTERNAL = "internal error while preparing (the server log names the failure)"


class Preparer:
    """Submits studies to the worker's background lane and records how each one went."""

    def __init__(self, node):
        self.node = node
        self._warned = False

    def submit(self, study_uid: str) -> bool:
        """Queue the study's preparation; False when it cannot be queued now (it is then failed
        with why, or left queued while the model loads)."""
        node = self.node
        study = node.book.study(study_uid)
        if study is None:
            return False
        node.book.classify(study)
        if not study.readable_series():
            reasons = sorted({s.skipped for s in study.series if s.skipped})
            node.book.set_state(study_uid, "failed", why="no series the model reads: " + "; ".join(reasons))
            return False
        model = getattr(node.state.backend, "model", None) if node.state is not None else None
        if model is None or not hasattr(model, "prepare_steps"):
            node.book.set_state(study_uid, "failed", why="preparing needs the local model (serve -m BUNDLE)")
            return False
        if getattr(model.image_cache, "dir", None) is None and not self._warned:
            self._warned = True  # said once: every preparation would be kept in memory only
            log.warning("the model has no disk image cache: prepared studies do not outlive the next question "
                        "about another study (serve sets one beside the spool unless --image-cache is given)")
        messages = study_messages(study)
        max_slices = node.config.max_slices
        pin = contextlib.ExitStack()
        pin.enter_context(node.spool.pinned(study_uid))

        def make_steps(should_pause):
            return model.prepare_steps(messages, max_slices=max_slices, should_pause=should_pause)

        kinds = set()

        def on_step(step):
            kinds.add(step.kind)
            node.book.set_state(study_uid, "preparing", done=step.done, total=step.total)

        def on_done(err):
            pin.close()
            self.finished(study_uid, err, again=kinds == {"skipped"})

        node.book.set_state(study_uid, "preparing", done=0, total=None)
        try:
            node.state.worker.submit_steps(make_steps, on_step=on_step, on_done=on_done)
        except Exception as err:  # the worker is stopping
            pin.close()
            self.finished(study_uid, err)
            return False
        return True

    def finished(self, study_uid: str, err: BaseException | None, again: bool = False) -> None:
        """`again`: the study's prefix was saved before (a restart, a resend of the same study):
        nothing was computed, and the audit says so."""
        node = self.node
        if node.stopping:  # the worker cancels what it holds at shutdown: no outcome to record
            return
        if err is None:
            node.book.set_state(study_uid, "ready")
            node.event("study_prepared", study_uid, outcome="ok: prepared before" if again else "ok")
            return
        if isinstance(err, (InputError, BundleError)):
            why = str(err).splitlines()[0] if str(err) else type(err).__name__
            # a file is named by its place in the spool (hashed names), not the server's whole path
            why = why.replace(str(node.spool.root) + os.sep, "spool" + os.sep)
        else:
            log.error("preparing a study failed: %s", type(err).__name__)
            why = INTERNAL
        node.book.set_state(study_uid, "failed", why=why)
        node.event("study_prepared", study_uid, outcome="failed")
