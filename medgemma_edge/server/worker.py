"""One model worker: a single thread runs backend calls one at a time, in arrival order.

The model answers one caller at a time anyway (`Model` holds a lock); a queue in front of it lets
the server say "busy, come back in N s" (429) instead of parking threads on that lock. A job's
results cross to the event loop through an asyncio queue; `cancel()` (a client went away) drops a
waiting job at once and stops a running one at its next item.

Background lane (`submit_steps`): long work that can be cut into steps (preparing a study,
runtime/prepare_steps.py) runs one step at a time, and only while no job waits: a question
arriving meanwhile waits for the current step, never the whole task. A step that says
interleave=False (the model holds a half-built state) is followed by the task's next step before
any job; the task's `should_pause()` (a job waits) asks it to reach a step that says True. Lane
tasks run in submission order, one at a time, and do not count against --max-queue; their
outcome goes to `on_done(error)` (None at the end, `Cancelled` when cancelled or stopped), never
out of the worker.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator

log = logging.getLogger("medgemma_edge.server")
DONE = object()  # the last item of every job
STOP_WAIT_S = 10.0  # how long shutdown waits for a running job to notice its cancellation


class QueueFull(Exception):
    """More requests wait than --max-queue allows."""


class Cancelled(Exception):
    """A background task was cancelled, or the worker stopped, before the task's end."""


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


class Task:
    """A background task on the lane: `make_steps(should_pause)` gives its step iterator (made at
    its first step, on the worker thread); `on_step(step)` after each step, `on_done(error)` once."""

    def __init__(self, make_steps: Callable[[Callable[[], bool]], Iterable], on_step=None, on_done=None):
        self.make_steps, self.on_step, self.on_done = make_steps, on_step, on_done
        self._cancel = threading.Event()
        self.steps: Iterator | None = None
        self.started = False  # the worker took it up (set under the worker's lock)
        self.interleave = True  # its last step left the model free for others
        self.done = False

    def cancelled(self) -> bool:
        return self._cancel.is_set()


class Worker:
    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self._pending: collections.deque[Job] = collections.deque()
        self._lane: collections.deque[Task] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.running: Job | None = None
        self._mean_s = 2.0  # moving mean of a job's duration, for Retry-After
        self.last_work = time.monotonic()  # when the last job or background step ended (server/idle.py)

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

    def submit_steps(self, make_steps, on_step=None, on_done=None) -> Task:
        """Queue a background task on the lane (module docstring); from any thread. Never refused:
        on a stopped worker its on_done gets Cancelled at once."""
        task = Task(make_steps, on_step, on_done)
        with self._cond:
            stopping = self._stopping
            if not stopping:
                self._lane.append(task)
                self._cond.notify()
        if stopping:
            self._report(task, Cancelled())
        return task

    def cancel(self, job: Job | Task) -> None:
        """Cancel a job or a lane task: dropped at once if it has not started, else stopped at its
        next item or step."""
        job._cancel.set()
        if isinstance(job, Task):
            with self._cond:
                unstarted = not job.started and job in self._lane
                if unstarted:
                    self._lane.remove(job)
                self._cond.notify()
            if unstarted:
                self._report(job, Cancelled())
            return
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
        """A request is answered or waits (background tasks yield to requests: not counted)."""
        return self.running is not None or bool(self._pending)

    @property
    def background(self) -> int:
        """Lane tasks not finished."""
        return len(self._lane)

    @property
    def idle(self) -> bool:
        """No job runs or waits and no background task is unfinished."""
        return not self.busy and not self._lane

    def retry_after(self) -> int:
        """Seconds until a place in the queue is likely free: one job's usual duration."""
        return max(1, min(600, math.ceil(self._mean_s)))

    # -- thread side ---------------------------------------------------------------------------
    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="medgemma-edge-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Cancel everything; a task in the middle of its steps is closed by the worker thread after
        its current step (its generator runs there)."""
        with self._cond:
            self._stopping = True
            pending, self._pending = list(self._pending), collections.deque()
            unstarted = [t for t in self._lane if not t.started]
            for task in self._lane:
                task._cancel.set()
            self._lane = collections.deque(t for t in self._lane if t.started)
            if self.running is not None:
                self.running._cancel.set()
            self._cond.notify_all()
        for job in pending:
            job._cancel.set()
            job.push(DONE)
        for task in unstarted:
            self._report(task, Cancelled())
        if self._thread is not None:
            self._thread.join(STOP_WAIT_S)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._lane and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    break
                task = self._lane[0] if self._lane else None
                job = None
                if self._pending and (task is None or task.interleave or task.cancelled()):
                    job, task = self._pending.popleft(), None
                    self.running = job
                elif task is not None:
                    task.started = True
            if task is not None:
                self._step(task)
                self.last_work = time.monotonic()
                continue
            t0 = time.perf_counter()
            try:
                self._run(job)
            finally:
                self._mean_s = 0.8 * self._mean_s + 0.2 * (time.perf_counter() - t0)
                with self._cond:
                    self.running = None
                    self.last_work = time.monotonic()
        for task in list(self._lane):  # stopping: the started task, whose generator lives here
            self._finish(task, Cancelled())

    def _step(self, task: Task) -> None:
        """One step of the lane's first task; its end, failure or cancellation finishes it."""
        if task.cancelled():
            self._finish(task, Cancelled())
            return
        try:
            if task.steps is None:
                task.steps = iter(task.make_steps(lambda: bool(self._pending)))
            step = next(task.steps)
            task.interleave = getattr(step, "interleave", True) is not False
            if task.on_step is not None:
                task.on_step(step)
        except StopIteration:
            self._finish(task, None)
        except BaseException as err:  # the task's outcome, never the worker's end
            self._finish(task, err)

    def _finish(self, task: Task, error: BaseException | None) -> None:
        close = getattr(task.steps, "close", None)
        if close is not None:  # a paused preparation lets go of its partial state now
            try:
                close()
            except Exception as err:
                log.error("closing a background task failed: %s", type(err).__name__)
        with self._cond:
            if task in self._lane:
                self._lane.remove(task)
        self._report(task, error)

    @staticmethod
    def _report(task: Task, error: BaseException | None) -> None:
        if task.done:
            return
        task.done = True
        if task.on_done is not None:
            try:
                task.on_done(error)
            except Exception as err:
                log.error("a background task's on_done failed: %s", type(err).__name__)

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
