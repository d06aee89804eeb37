"""The layers every request passes before a route: access log, Host check, API key, body limit.

Plain ASGI (not BaseHTTPMiddleware), so streamed answers pass through untouched.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time

from medgemma_edge.server.errors import INTERNAL, error_body

log = logging.getLogger("medgemma_edge.server")
DRAIN_BYTES = 256 << 20  # read (and drop) this much of a refused body, so the client gets our answer


async def send_error(send, status: int, message: str, headers: dict | None = None) -> None:
    body = json.dumps(error_body(status, message)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def drain(receive, limit: int = DRAIN_BYTES) -> None:
    """Read what the client is still sending: a client blocked writing a body it may not send
    reads a connection reset instead of our 4xx when the server closes on it."""
    seen = 0
    while seen <= limit:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return
        seen += len(message.get("body", b""))


_STUDY_PATH = re.compile(r"^(/v1/studies/)[^/]+")


def logged_path(path: str) -> str:
    """The path as the log shows it: a study UID (it can identify a patient's study) left out."""
    return _STUDY_PATH.sub(r"\1UID", path)


class AccessLog:
    """One line per request: method, path, status, seconds — never the query, body or headers
    (they can hold a prompt, an image or a key). Also the last resort for an exception a route
    let through: a generic 500, logged by type name, no traceback."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), None

        async def send_logged(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        except Exception as err:
            log.error("%s %s failed: %s", scope["method"], scope["path"], type(err).__name__)
            if status is None:
                await send_error(send_logged, 500, INTERNAL)
        finally:
            log.info("%s %s %s %.3fs", scope["method"], logged_path(scope["path"]), status or "-",
                     time.perf_counter() - t0)


class HostCheck:
    """Without a key, only requests addressed to this machine (`Host`: a loopback name or an
    --allow-host name) are answered. A web page on another origin can point a name it owns at
    127.0.0.1 (DNS rebinding) and then read a keyless server as its own origin; its requests
    still carry that name in `Host`, so they stop here."""

    def __init__(self, app, config):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.config.host_allowed(dict(scope["headers"]).get(b"host")):
            return await self.app(scope, receive, send)
        await drain(receive, 1 << 20)
        await send_error(send, 421, "this server answers requests addressed to localhost, 127.0.0.1 or [::1] "
                                    "only — open it by one of those names, or start it with --allow-host NAME "
                                    "(or with --api-key-file)")


class ApiKey:
    """With a key, every request but GET /health and the kiosk page's own files needs
    `Authorization: Bearer KEY` (the page asks for the key and sends it)."""

    OPEN = ("/health", "/", "/favicon.ico")

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key.encode() if key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.key is None or self._open(scope):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.key):
            return await self.app(scope, receive, send)
        await drain(receive, 1 << 20)
        await send_error(send, 401, "missing or wrong API key — send 'Authorization: Bearer KEY' with the "
                                    "key of the server's --api-key-file")

    def _open(self, scope) -> bool:
        if scope["method"] not in ("GET", "HEAD"):
            return False
        path = scope["path"]
        return path in self.OPEN or path.startswith("/kiosk/")


class BodyLimit:
    """413 past `max_bytes`, decided from Content-Length when sent, else while reading. The body is
    read here whole and handed on, so routes never see more than the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._refuse(receive, send, more=message.get("more_body", False))
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False
        del chunks

        async def replay():
            nonlocal body, replayed
            if not replayed:
                replayed, data, body = True, body, b""  # not held here for the whole answer
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()  # after the body: http.disconnect when the client leaves

        await self.app(scope, replay, send)

    async def _refuse(self, receive, send, more: bool = True):
        if more:
            await drain(receive)
        mb = self.max_bytes / (1 << 20)
        await send_error(send, 413, f"the request body is larger than this server's limit of {mb:g} MB — send "
                                    "fewer or smaller images, upload a series to POST /v1/images, or start the "
                                    "server with a larger --max-body-mb")
