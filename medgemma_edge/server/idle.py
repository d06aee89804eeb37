"""`serve --idle-unload MINUTES`: the model gives its memory back when nobody has used it for a while.

A kiosk answers by day; at night nothing asks, and the model's memory (MedGemma 4B's weights and KV
cache: several GB) is better given back to the machine. A timer thread looks a few times per idle
period: when the worker has no job running or waiting, no background task (preparing a study or an
upload is work), and its last work ended MINUTES ago, it calls `Model.unload(wait=False)`
(runtime/residency.py), which does nothing if a caller holds the model. `/health` then says
"unloaded". The next request that needs the model opens it again on the worker, before its own
work (`/health`: "loading"): the answer waits for that, and requests behind it wait in the queue as
usual; a study arriving at the DICOM node loads it too, to be prepared. `GET /health`,
`/v1/models`, `/metrics` and the kiosk's files neither load it nor count as use (as llama.cpp's
`--sleep-idle-seconds`, whose exempt endpoints are /health, /props and /models).

A job taken up between the timer's look and the unload only reopens the model: the model's lock
makes the unload and every use of it one at a time (runtime/residency.py).
"""

from __future__ import annotations

import logging
import threading
import time

from medgemma_edge.runtime.memory import rss_mb

log = logging.getLogger("medgemma_edge.server")
LOOKS_PER_PERIOD = 4  # how often per idle period the timer looks (at most every MAX_LOOK_S)
MAX_LOOK_S = 30.0


class IdleUnload:
    def __init__(self, state, idle_s: float):
        self.state, self.idle_s = state, idle_s
        self.every = min(MAX_LOOK_S, idle_s / LOOKS_PER_PERIOD)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "IdleUnload":
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="medgemma-edge-idle", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.check()
            except Exception as err:  # the server keeps serving; the type names the failure
                log.error("idle unload: %s", type(err).__name__)

    def check(self) -> bool:
        """Unload the model now if it has been idle long enough; whether it did."""
        model = getattr(self.state.backend, "model", None)  # an upstream engine has none here
        worker = self.state.worker
        if model is None or not model.loaded or not worker.idle:
            return False
        idle_s = time.monotonic() - worker.last_work
        if idle_s < self.idle_s:
            return False
        before = rss_mb()
        if not model.unload(wait=False):
            return False
        log.info("unloaded the model after %.0f s idle (resident memory %s → %s MB); the next request loads it "
                 "again", idle_s, before, rss_mb())
        return True
