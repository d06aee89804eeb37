"""Running the app with uvicorn: `serve` (the CLI, blocking) and `ServerThread` (an app or a test
that wants the server beside it, on a free loopback port)."""

from __future__ import annotations

import copy
import logging
import socket
import ssl
import threading
import time
from pathlib import Path

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from medgemma_edge.runtime.errors import InputError
from medgemma_edge.server.app import build_app
from medgemma_edge.server.config import ServerConfig, is_loopback

log = logging.getLogger("medgemma_edge.server")
START_TIMEOUT_S = 30.0


def _uvicorn_config(app, config: ServerConfig, log_config) -> uvicorn.Config:
    # uvicorn's access log prints the query string and client address; ours (middleware.AccessLog)
    # prints method, path and status only.
    return uvicorn.Config(app, host=config.host, port=config.port, access_log=False, log_config=log_config,
                          lifespan="on", server_header=False, timeout_graceful_shutdown=5,
                          ssl_certfile=config.ssl_certfile, ssl_keyfile=config.ssl_keyfile)


def check_tls(config: ServerConfig) -> None:
    """InputError, one line, when the certificate and key cannot be loaded — before the port opens,
    not as uvicorn's traceback once it does. An encrypted key is refused rather than prompted for:
    a service has no terminal to type its password on."""
    if config.ssl_certfile is None:
        return
    for flag, path in (("--ssl-certfile", config.ssl_certfile), ("--ssl-keyfile", config.ssl_keyfile)):
        if path is not None and not Path(path).is_file():
            raise InputError(f"{flag} {path}: no such file — give the path of the PEM file (docs/server.md#tls)")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(config.ssl_certfile, config.ssl_keyfile,
                                                                password=lambda: b"")
        return
    except ssl.SSLError as err:
        why = ("the key is not this certificate's" if err.reason == "KEY_VALUES_MISMATCH"
               else "not a PEM certificate with its unencrypted PEM key")
    except OSError as err:  # not readable by this user
        why = err.strerror or type(err).__name__
    raise InputError(f"--ssl-certfile {config.ssl_certfile}: cannot load it ({why}) — give the PEM certificate "
                     "and its unencrypted key (--ssl-keyfile), readable by this user (docs/server.md#tls)")


def warn_plain_http(config: ServerConfig) -> None:
    """One warning when other machines can reach a port that speaks plain HTTP: the key, the
    questions and the answers cross the network readable by anyone on the way."""
    if config.ssl_certfile is None and not is_loopback(config.host):
        log.warning("serving plain HTTP on %s: the API key, questions and answers cross the network "
                    "unencrypted — pass --ssl-certfile/--ssl-keyfile, or keep a TLS proxy in front "
                    "(docs/server.md#tls)", config.host)


def logging_config() -> dict:
    """uvicorn's own logging, plus our logger on the same stderr handler."""
    out = copy.deepcopy(LOGGING_CONFIG)
    out["loggers"]["medgemma_edge"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return out


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: one the OS picks), so the port is ours before uvicorn
    starts; InputError when it cannot be had (in use, not this machine's address)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as err:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({err.strerror or type(err).__name__}) — is another "
                         "server using the port? choose another with --port") from None
    return sock


def serve(backend, config: ServerConfig | None = None, node=None) -> None:
    """Serve `backend` until interrupted (Ctrl-C / SIGTERM stop it cleanly). `backend` may be a
    loader (build_app): the port answers at once (/health "loading", chat 503) while it loads; if
    loading fails, the server stops and the loader's error is raised here. node: a NodeConfig, to
    run the DICOM node beside it (build_app); a DICOM port that cannot be had stops it the same way."""
    config = (config or ServerConfig()).check()
    check_tls(config)
    sock = listening_socket(config.host, config.port)
    try:
        app = build_app(backend, config, node)
    except BaseException:
        sock.close()
        raise
    server = uvicorn.Server(_uvicorn_config(app, config, logging_config()))
    warn_plain_http(config)  # now: uvicorn's config above set up the handler it is printed by
    state = app.state.medgemma
    state.on_load_failure = lambda: setattr(server, "should_exit", True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if state.load_failure is not None:
        raise state.load_failure


class ServerThread:
    """`with ServerThread(build_app(backend)) as server:` … `server.url` … — uvicorn in a thread on
    127.0.0.1 and a port the OS picks (or `port`), stopped on exit. Logging is left to the host."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        state = getattr(getattr(app, "state", None), "medgemma", None)
        if state is not None:  # the same rule as `serve`: no key, no listening beyond this machine
            ServerConfig(host=host, api_key=state.config.api_key).check()
        self.app, self.host = app, host
        self._socket = listening_socket(host, port)
        self.port = self._socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self._server = uvicorn.Server(_uvicorn_config(app, ServerConfig(host=host, port=self.port), None))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="medgemma-edge-server", daemon=True)

    def start(self) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (see the log)")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(START_TIMEOUT_S)
        self._socket.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
