"""One model worker: a single thread runs backend calls one at a time, in arrival order.

The model answers one caller at a time anyway (`Model` holds a lock); a queue in front of it lets
the server say "busy, come back in N s" (429) instead of parking threads on that lock. A job's
results cross to the event loop through an asyncio queue; `cancel()` (a client went away) drops a
waiting job at once and stops a running one at its next item.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable

log = logging.getLogger("medgemma_edge.server")
DONE = object()  # the last item of every job
STOP_WAIT_S = 10.0  # how long shutdown waits for a running job to notice its cancellation


class QueueFull(Exception):
    """More requests wait than --max-queue allows."""


class Job:
    """`run(cancelled)` returns an iterable (or None); its items reach `next()` on the event loop."""

    def __init__(self, run: Callable[[Callable[[], bool]], Iterable | None], loop=None):
        self.run = run
        self._loop = loop  # None: nobody awaits the items (a background job)
        self._items: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._cancel = threading.Event()
        self._finished = False  # DONE was delivered

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def push(self, item) -> None:
        if self._loop is None or self._finished:
            return
        if item is DONE:
            self._finished = True
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is shutting down
            self._cancel.set()

    async def next(self):
        """The next item, DONE at the end; a failure of the job is raised here."""
        item = await self._items.get()
        if isinstance(item, BaseException):
            raise item
        return item


class Worker:
    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.running: Job | None = None
        self._mean_s = 2.0  # moving mean of a job's duration, for Retry-After

    # -- event-loop side ---------------------------------------------------------------------
    def submit(self, run, *, background: bool = False) -> Job:
        """Queue `run`; QueueFull when --max-queue jobs already wait. A background job's items go
        nowhere (it records its outcome itself)."""
        job = Job(run, None if background else asyncio.get_running_loop())
        with self._cond:
            if self._stopping or self.full():
                raise QueueFull()
            self._pending.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        job._cancel.set()
        with self._cond:
            if job in self._pending:  # never started: free its place now
                self._pending.remove(job)
                job.push(DONE)

    def full(self) -> bool:
        """A job submitted now would be refused (one may always run when nothing else does)."""
        return len(self._pending) >= self.max_queue and (self.running is not None or bool(self._pending))

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def busy(self) -> bool:
        return self.running is not None or bool(self._pending)

    def retry_after(self) -> int:
        """Seconds until a place in the queue is likely free: one job's usual duration."""
        return max(1, min(600, math.ceil(self._mean_s)))

    # -- thread side ---------------------------------------------------------------------------
    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="medgemma-edge-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            pending, self._pending = list(self._pending), collections.deque()
            if self.running is not None:
                self.running._cancel.set()
            self._cond.notify_all()
        for job in pending:
            job._cancel.set()
            job.push(DONE)
        if self._thread is not None:
            self._thread.join(STOP_WAIT_S)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self.running = self._pending.popleft()
            t0 = time.perf_counter()
            try:
                self._run(job)
            finally:
                self._mean_s = 0.8 * self._mean_s + 0.2 * (time.perf_counter() - t0)
                with self._cond:
                    self.running = None

    @staticmethod
    def _run(job: Job) -> None:
        items = None
        try:
            items = job.run(job.cancelled)
            for item in items or ():
                job.push(item)
                if job.cancelled():
                    break
        except BaseException as err:  # handed to the request, which turns it into a status
            job.push(err)
        finally:
            close = getattr(items, "close", None)
            if close is not None:  # a generator holding the model lets go of it now
                try:
                    close()
                except Exception as err:
                    log.error("closing an answer failed: %s", type(err).__name__)
            job.push(DONE)
