"""What the routes share: the backend (or its loader), the model worker, the uploads, the limits,
the DICOM node when `serve --dicom-port` runs one (its answers kept for POST /v1/results), and the
idle timer of `serve --idle-unload` (server/idle.py)."""

from __future__ import annotations

import logging

from medgemma_edge.runtime.errors import MedGemmaEdgeError
from medgemma_edge.server.config import ServerConfig
from medgemma_edge.node.audit import key_id
from medgemma_edge.server.errors import INTERNAL, ApiError
from medgemma_edge.server.studies import Previews, RecentAnswers
from medgemma_edge.server.uploads import UploadStore
from medgemma_edge.server.worker import Job, QueueFull, Worker

log = logging.getLogger("medgemma_edge.server")


class ServerState:
    def __init__(self, backend, config: ServerConfig, node_config=None):
        self.config = config
        # A zero-argument callable is a loader, run on the worker so the port answers (503,
        # /health "loading") while a large bundle loads.
        self.loader = backend if callable(backend) and not hasattr(backend, "chat") else None
        self.backend = None if self.loader is not None else backend
        self.load_error: str | None = None  # what clients are told when loading failed
        self.load_failure: BaseException | None = None
        self.on_load_failure = None  # callable(): `serve` stops the server then (one line, exit 2)
        self.worker = Worker(config.max_queue)
        self.uploads = UploadStore(config.uploads_kept, int(config.uploads_mb * (1 << 20)))
        self.node = None  # the DICOM node (node/node.py); its spool is opened now, it listens at start()
        if node_config is not None:
            from medgemma_edge.node.node import Node

            self.node = Node(node_config, self)
        self.answers = RecentAnswers()
        self.previews = Previews()
        self.key_id = key_id(config.api_key)  # what the audit writes for the key, never the key
        self.metrics = None  # server/metrics.Metrics with serve --metrics
        self.idle = None  # server/idle.IdleUnload with serve --idle-unload

    def start(self) -> None:
        self.worker.start()
        if self.config.idle_unload_min is not None:
            from medgemma_edge.server.idle import IdleUnload

            self.idle = IdleUnload(self, self.config.idle_unload_min * 60).start()
        if self.loader is not None and self.backend is None:
            self.worker.submit(self._load, background=True)
        if self.node is not None:  # receives now; prepares once the model is loaded (Node.tick)
            self.node.start()

    def stop(self) -> None:
        if self.idle is not None:
            self.idle.stop()
        if self.node is not None:
            self.node.stop()
        self.worker.stop()

    def _load(self, cancelled) -> None:
        try:
            self.backend = self.loader()
            return
        except MedGemmaEdgeError as err:
            self.load_error = str(err)
            log.error("loading the model failed: %s", err)
            self.load_failure = err
        except Exception as err:
            self.load_error = INTERNAL
            log.error("loading the model failed: %s", type(err).__name__)
            self.load_failure = err
        if self.on_load_failure is not None:
            self.on_load_failure()

    @property
    def status(self) -> str:
        if self.backend is None:
            return "error" if self.load_error else "loading"
        if not self.model_loaded:  # given back when idle (server/idle.py); the next request opens it again
            return "loading" if self.backend.model.loading else "unloaded"
        return "busy" if self.worker.busy else "ready"

    @property
    def model_loaded(self) -> bool:
        """The model is in memory: loaded, and not unloaded for being idle (an upstream backend: once made)."""
        model = getattr(self.backend, "model", None)
        return self.backend is not None and (model is None or model.loaded)

    def require_backend(self):
        if self.backend is None:
            if self.load_error:
                raise ApiError(503, f"the model could not be loaded: {self.load_error}")
            raise ApiError(503, "the model is still loading — ask again in a few seconds",
                           headers={"Retry-After": "5"})
        return self.backend

    def submit(self, run, *, background: bool = False) -> Job:
        try:
            return self.worker.submit(run, background=background)
        except QueueFull:
            raise self._busy() from None

    def check_queue(self) -> None:
        """429 now, before slow work, when a job submitted now would be refused."""
        if self.worker.full():
            raise self._busy()

    def _busy(self) -> ApiError:
        wait = self.worker.retry_after()
        return ApiError(429, f"the server is busy ({self.worker.waiting} requests are waiting for the model) — "
                             f"ask again in {wait} s", headers={"Retry-After": str(wait)})

