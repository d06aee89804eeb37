"""`GET /metrics` (serve --metrics): Prometheus' text format through prometheus-client.

Each app has its own `CollectorRegistry`, so servers side by side in one process (an app's
ServerThread, the tests) count apart. No label carries request content: an endpoint is its route
template ("/v1/studies/{study_uid}", never the UID, which can identify a patient's study), a method
one of a fixed few, a status a number. The answer timings are the backend's own `Stats`, read once
from an answer's last Response (server/chat.py); nothing is measured twice or per token.
"""

from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,
                               generate_latest)
from starlette.responses import Response
from starlette.routing import Match

from medgemma_edge.runtime.memory import peak_rss_mb

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # any other: "other"
NO_ROUTE = "other"  # a path no route matches: its text is the client's, never a label
# Buckets: a text question answers its first token in a fraction of a second; a new CT series on a
# CPU takes minutes (benchmarks/results/ has the measured times to first token).
SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TOKENS_PER_S = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class Metrics:
    """The collectors of one app; `state` (ServerState) is read at scrape time for the gauges."""

    def __init__(self, state):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("medgemma_edge_http_requests", "HTTP requests answered, by route template and status",
                                ["endpoint", "method", "status"], registry=registry)
        self.ttft = Histogram("medgemma_edge_time_to_first_token_seconds", "from an answer's start (after the "
                              "queue) to its first token", buckets=SECONDS, registry=registry)
        self.encode = Histogram("medgemma_edge_image_encode_seconds", "image encoding of one answer, for answers "
                                "that encoded at least one image", buckets=SECONDS, registry=registry)
        self.prefill = Histogram("medgemma_edge_prefill_tokens_per_second", "prompt evaluation speed of one answer",
                                 buckets=TOKENS_PER_S, registry=registry)
        self.decode = Histogram("medgemma_edge_decode_tokens_per_second", "generation speed of one answer",
                                buckets=TOKENS_PER_S, registry=registry)
        self.images = Counter("medgemma_edge_images", "images in answered prompts", registry=registry)
        self.cache_hits = Counter("medgemma_edge_image_cache_hits", "of those, images whose embeddings came from "
                                  "the image cache", registry=registry)
        self.restores = Counter("medgemma_edge_prepared_restores", "answers that started from a prepared study's "
                                "prefix restored from disk", registry=registry)
        self.answers = Counter("medgemma_edge_answers", "answers finished, by finish reason (stop, length, "
                               "repetition)", ["finish_reason"], registry=registry)
        self.repetitions = Counter("medgemma_edge_repetition_stops", "of those, answers the repetition guard "
                                   "stopped in a loop (runtime/repetition.py)", registry=registry)
        Gauge("medgemma_edge_queue_length", "requests waiting for the model", registry=registry).set_function(
            lambda: state.worker.waiting)
        Gauge("medgemma_edge_background_tasks", "background preparations not finished", registry=registry
              ).set_function(lambda: state.worker.background)
        Gauge("medgemma_edge_model_loaded", "1 while the model is in memory; 0 while loading, after a failed load, "
              "or unloaded when idle (serve --idle-unload)", registry=registry).set_function(
            lambda: float(state.model_loaded))
        # runtime/memory.py: VmHWM, not ru_maxrss, which a process started by a large parent inherits
        Gauge("medgemma_edge_peak_rss_bytes", "peak resident memory of this process", registry=registry
              ).set_function(lambda: round(peak_rss_mb() * (1 << 20)))
        ProcessCollector(registry=registry)  # process_*: current RSS, CPU seconds, open files (Linux)

    def record(self, last) -> None:
        """A finished answer, from its last Response: its finish reason (one of the backend's own few)
        and its Stats (runtime/reply.py), where fields a backend did not measure are None."""
        self.answers.labels(str(last.finish_reason)).inc()
        stats = last.stats
        if stats is None:
            return
        for histogram, value in ((self.ttft, stats.ttft_s), (self.prefill, stats.prefill_tok_s),
                                 (self.decode, stats.decode_tok_s)):
            if value is not None:
                histogram.observe(value)
        if stats.image_encode_s is not None and stats.images > stats.images_from_cache:
            self.encode.observe(stats.image_encode_s)
        self.images.inc(stats.images)
        self.cache_hits.inc(stats.images_from_cache)
        if stats.restored_tokens:
            self.restores.inc()
        if stats.repetition_period is not None:
            self.repetitions.inc()

    def page(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


async def metrics_page(request):
    return request.app.state.medgemma.metrics.page()


class RequestCount:
    """Counts every request by route template, method and status, the refused ones too (outermost
    layer: a 401, 413 or 421 never reaches a route). Plain ASGI, like middleware.py."""

    def __init__(self, app, metrics: Metrics, routes):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = None

        async def send_counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            if status is not None:  # None: the client left before any answer
                method = scope["method"] if scope["method"] in METHODS else "other"
                self.metrics.requests.labels(endpoint_of(self.routes, scope), method, str(status)).inc()


def endpoint_of(routes, scope) -> str:
    """The template of the route `scope`'s path matches (whatever its method), else NO_ROUTE."""
    for route in routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            return route.path
    return NO_ROUTE
