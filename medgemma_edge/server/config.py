"""What a server is allowed to do: bind address, key, limits. One dataclass, checked before loading."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.generate import DEFAULT_MAX_NEW_TOKENS

DEFAULT_PORT = 8080
MAX_QUEUE = 8  # requests waiting for the model; one answer at a time runs, so more only waits longer
MAX_BODY_MB = 128  # an 85-slice CT series as base64 data URLs is ~60 MB
MAX_IMAGES = 128  # image parts per request (a DICOM part counts one, an upload its pictures)
UPLOADS_KEPT = 32  # uploads by id kept in memory; older ones are forgotten first
UPLOADS_MB = 1024  # ... and at most this many MB of their pixels
# A chat body's bytes outside its image data: URLs (text, tools, options). Text has no use for an
# image's allowance: the longest MedGemma context holds a few MB of text at most, and the text
# bound from the context (server/chat.py) refuses a longer prompt before it is tokenized.
MAX_TEXT_MB = 8
MAX_TOKENS = DEFAULT_MAX_NEW_TOKENS  # answer length when a request names none (as in `ask`)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key: str | None = None  # every request but /health and the kiosk's files needs `Bearer KEY`
    max_queue: int = MAX_QUEUE
    max_body_mb: float = MAX_BODY_MB
    max_images: int = MAX_IMAGES
    cors_origin: str | None = None  # no CORS headers at all unless set
    metrics: bool = False  # GET /metrics, Prometheus' text format (server/metrics.py)
    ssl_certfile: str | None = None  # HTTPS with this PEM certificate (chain) and ssl_keyfile (runner.py)
    ssl_keyfile: str | None = None  # None with a certfile: the key is in the certfile
    # Without a key, requests must name this machine in `Host` (localhost, 127.0.0.1, [::1]) or
    # one of these names: a web page elsewhere cannot reach a keyless server by DNS rebinding.
    allowed_hosts: tuple[str, ...] = ()
    max_text_mb: float = MAX_TEXT_MB
    uploads_kept: int = UPLOADS_KEPT
    uploads_mb: float = UPLOADS_MB
    max_tokens: int = MAX_TOKENS
    # stop looping answers (runtime/repetition.py) unless a request's medgemma_edge.repetition_guard says not
    repetition_guard: bool = True
    # give the model's memory back after this many minutes without work; the next request loads it (server/idle.py)
    idle_unload_min: float | None = None

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))

    @property
    def max_text_bytes(self) -> int:
        return int(self.max_text_mb * (1 << 20))

    def host_allowed(self, header: bytes | str | None) -> bool:
        """Whether a request with this `Host` header is answered: any, with a key; else loopback
        names and `allowed_hosts` only (a missing Host is no browser's, but is refused too)."""
        if self.api_key is not None:
            return True
        name = host_name(header.decode("latin-1") if isinstance(header, bytes) else header or "")
        return bool(name) and (is_loopback(name) or name in self.allowed_hosts)

    def check(self) -> "ServerConfig":
        """InputError naming the first setting that cannot be served; the config otherwise."""
        for name in ("max_queue", "max_images", "uploads_kept", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "max_queue" else 1):
                raise InputError(f"{name} must be a positive integer, got {value!r:.40}")
        if not isinstance(self.repetition_guard, bool):
            raise InputError(f"repetition_guard must be True or False, got {self.repetition_guard!r:.40}")
        if not self.max_body_mb > 0 or not self.uploads_mb > 0 or not self.max_text_mb > 0:
            raise InputError("max_body_mb, max_text_mb and uploads_mb must be positive")
        idle = self.idle_unload_min
        if idle is not None and (not isinstance(idle, (int, float)) or isinstance(idle, bool) or not idle > 0):
            raise InputError(f"idle_unload_min must be a positive number of minutes, got {idle!r:.40}")
        if isinstance(self.allowed_hosts, str):
            raise InputError("allowed_hosts must be a list of host names, not one string")
        for name in self.allowed_hosts:
            if not isinstance(name, str) or not _HOST_NAME.fullmatch(name) or host_name(name) != name:
                raise InputError(f"--allow-host {str(name)!r:.60} is not a host name — give the name "
                                 "clients put in the URL, lower case, without port (e.g. kiosk.clinic.local)")
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise InputError("--ssl-keyfile needs --ssl-certfile: give the certificate the key belongs to")
        if self.api_key is not None and not self.api_key:
            raise InputError("the API key is empty — put the key on the first line of the --api-key-file")
        # Anyone who can reach a non-loopback port could read answers about patients' images.
        if not is_loopback(self.host) and self.api_key is None:
            raise InputError(f"--host {self.host} is reachable from other machines: pass --api-key-file "
                             "FILE (clients then send 'Authorization: Bearer KEY'), or keep --host 127.0.0.1")
        return self


_HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\]")


def host_name(header: str) -> str:
    """The name in a `Host` header: lower case, without port or a final dot ("[::1]" stays bracketed)."""
    text = header.strip().lower()
    if text.startswith("["):
        return text[:text.find("]") + 1] if "]" in text else ""
    return text.partition(":")[0].rstrip(".")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name other than localhost: it may resolve to anything
        return False


def read_api_key(path) -> str:
    """The key: the file's first line, stripped (a key file is written by hand or by a script)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the API key file ({type(err).__name__}) — "
                         "write the key on its first line") from None
    key = text.splitlines()[0].strip() if text.strip() else ""
    if not key:
        raise InputError(f"{path}: the API key file is empty — write the key on its first line")
    return key
