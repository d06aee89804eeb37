"""The local OpenAI-compatible HTTP server (`medgemma-edge serve`; needs the `serve` extra).

    build_app(backend, config)  -> the Starlette app (app.py); backend: server.backend.LocalBackend
    ServerConfig                   host, key, limits (config.py)
    serve(backend, config)         run it with uvicorn until interrupted (runner.py)
    ServerThread(app)              run it in a thread on a free loopback port (apps, tests)

    backend.py    what answers: the local Model, or an upstream engine (upstream.py; what each
                  engine is sent: upstream_request.py; the openai SDK client: upstream_client.py)
    translate.py  OpenAI request -> runtime messages and options; data: URLs; upload ids
    chat.py       /v1/chat/completions, joined or as server-sent events; the text bounds
    images.py     /v1/images uploads: decode, preview (uploads.py: the in-memory store)
    studies.py    the DICOM node's worklist, previews, study questions and drafts (node/)
    worker.py     the single model thread and its bounded queue
    idle.py       serve --idle-unload: the model's memory given back when idle
    state.py      what the routes share: backend or its loader, worker, uploads, config
    http.py       a request's JSON body (depth-bounded), noticing a client that left
    middleware.py access log, Host check, API key, body limit; errors.py: OpenAI-shaped errors
    kiosk/        the page served at /

Names load lazily, so `medgemma_edge.server.backend` imports without Starlette.
"""

__all__ = ["build_app", "ServerConfig", "serve", "ServerThread"]


def __getattr__(name: str):
    if name == "build_app":
        from medgemma_edge.server.app import build_app

        return build_app
    if name == "ServerConfig":
        from medgemma_edge.server.config import ServerConfig

        return ServerConfig
    if name in ("serve", "ServerThread"):
        from medgemma_edge.server import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
