"""`build_app(backend, config)`: the Starlette app — routes, layers, and the worker's lifetime."""

from __future__ import annotations

import contextlib
import mimetypes
import re
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Route

from medgemma_edge.runtime.errors import MedGemmaEdgeError
from medgemma_edge.server.chat import chat_completions
from medgemma_edge.server.config import ServerConfig
from medgemma_edge.server.errors import error_response, response_for
from medgemma_edge.server.images import create_image, get_image, get_preview
from medgemma_edge.server.middleware import AccessLog, ApiKey, BodyLimit, HostCheck
from medgemma_edge.server.state import ServerState
from medgemma_edge.server.studies import create_result, get_result, get_study, list_studies, study_preview

KIOSK = Path(__file__).parent / "kiosk"
_ASSET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a file name in kiosk/, nothing that walks out of it
# The kiosk page runs our own script and style files only (no inline code, nothing from elsewhere),
# shows the preview as a blob: URL and its empty icon as data:, talks to this server alone, and
# may not be framed by another page (clickjacking a question about a patient's image).
KIOSK_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def build_app(backend, config: ServerConfig | None = None, node=None) -> Starlette:
    """The server for `backend` (a Backend, or a zero-argument callable returning one: it is then
    loaded on the worker while the port already answers). Serve it with uvicorn, or with
    `medgemma_edge.server.serve` / `ServerThread`. node: a NodeConfig (node/config.py) to run the
    DICOM node beside it (its spool is opened now; it listens while the app runs)."""
    config = (config or ServerConfig()).check()
    state = ServerState(backend, config, node)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            state.start()
        except MedGemmaEdgeError as err:  # the DICOM port cannot be had: one line, the server stops
            if state.on_load_failure is None:  # an app's ServerThread: it says the server did not start
                raise
            state.load_failure = err  # `serve` stops and raises it: one line, exit 2
            state.on_load_failure()
        try:
            yield
        finally:
            state.stop()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/images", create_image, methods=["POST"]),
        Route("/v1/images/{image_id}", get_image, methods=["GET"]),
        Route("/v1/images/{image_id}/preview.png", get_preview, methods=["GET"]),
        Route("/v1/studies", list_studies, methods=["GET"]),
        Route("/v1/studies/{study_uid}", get_study, methods=["GET"]),
        Route("/v1/studies/{study_uid}/preview.png", study_preview, methods=["GET"]),
        Route("/v1/results", create_result, methods=["POST"]),
        Route("/v1/results/{result_id}", get_result, methods=["GET"]),
        Route("/", kiosk_page, methods=["GET"]),
        Route("/kiosk/{asset}", kiosk_asset, methods=["GET"]),
    ]
    # Outermost first: log every request (even refused ones), refuse other hosts' names (DNS
    # rebinding), answer CORS preflights, check the key before reading a body, then bound the body.
    middleware = [Middleware(AccessLog), Middleware(HostCheck, config=config)]
    if config.cors_origin:
        middleware.append(Middleware(CORSMiddleware, allow_origins=[config.cors_origin],
                                     allow_methods=["GET", "POST"], allow_headers=["authorization", "content-type"]))
    middleware += [Middleware(ApiKey, key=config.api_key), Middleware(BodyLimit, max_bytes=config.max_body_bytes)]
    if config.metrics:  # under the key rules of every other route (middleware.ApiKey)
        from medgemma_edge.server.metrics import Metrics, RequestCount, metrics_page

        state.metrics = Metrics(state)
        routes.append(Route("/metrics", metrics_page, methods=["GET"]))
        middleware.insert(0, Middleware(RequestCount, metrics=state.metrics, routes=routes))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error})
    app.state.medgemma = state
    return app


async def health(request):
    state = request.app.state.medgemma
    backend = state.backend
    return JSONResponse({"status": state.status, "queue": state.worker.waiting,
                         "model": getattr(backend, "model_id", None), "notice": getattr(backend, "notice", None),
                         "node": state.node is not None})


async def models(request):
    state = request.app.state.medgemma
    try:
        backend = state.require_backend()
    except Exception as err:
        return response_for(err)
    return JSONResponse({"object": "list", "data": [{"id": backend.model_id, "object": "model", "created": 0,
                                                     "owned_by": "medgemma-edge"}]})


async def kiosk_page(request):
    return _kiosk_file("index.html")


async def kiosk_asset(request):
    return _kiosk_file(request.path_params["asset"])


def _kiosk_file(name: str):
    path = KIOSK / name
    if not _ASSET.fullmatch(name) or not path.is_file():
        return error_response(404, f"no kiosk file {name[:60]!r}")
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return FileResponse(path, media_type=media_type, headers=KIOSK_HEADERS)


async def _http_error(request, exc: HTTPException):
    messages = {404: f"no such endpoint: {request.method} {request.url.path[:80]}",
                405: f"{request.method} is not allowed on {request.url.path[:80]}"}
    return error_response(exc.status_code, messages.get(exc.status_code, str(exc.detail)), headers=exc.headers)
