"""What a server is allowed to do: bind address, key, limits. One dataclass, checked before loading."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from medgemma_edge.runtime.errors import InputError

DEFAULT_PORT = 8080
MAX_QUEUE = 8  # requests waiting for the model; one answer at a time runs, so more only waits longer
MAX_BODY_MB = 128  # an 85-slice CT series as base64 data URLs is ~60 MB
MAX_IMAGES = 128  # image parts per request (a DICOM part counts one, an upload its pictures)
UPLOADS_KEPT = 32  # uploads by id kept in memory; older ones are forgotten first
UPLOADS_MB = 1024  # ... and at most this many MB of their pixels
MAX_TOKENS = 256  # answer length when a request names none (the CLI's `ask` default)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key: str | None = None  # every request but /health and the kiosk's files needs `Bearer KEY`
    max_queue: int = MAX_QUEUE
    max_body_mb: float = MAX_BODY_MB
    max_images: int = MAX_IMAGES
    cors_origin: str | None = None  # no CORS headers at all unless set
    uploads_kept: int = UPLOADS_KEPT
    uploads_mb: float = UPLOADS_MB
    max_tokens: int = MAX_TOKENS

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))

    def check(self) -> "ServerConfig":
        """InputError naming the first setting that cannot be served; the config otherwise."""
        for name in ("max_queue", "max_images", "uploads_kept", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "max_queue" else 1):
                raise InputError(f"{name} must be a positive integer, got {value!r:.40}")
        if not self.max_body_mb > 0 or not self.uploads_mb > 0:
            raise InputError("max_body_mb and uploads_mb must be positive")
        if self.api_key is not None and not self.api_key:
            raise InputError("the API key is empty — put the key on the first line of the --api-key-file")
        # Anyone who can reach a non-loopback port could read answers about patients' images.
        if not is_loopback(self.host) and self.api_key is None:
            raise InputError(f"--host {self.host} is reachable from other machines: pass --api-key-file "
                             "FILE (clients then send 'Authorization: Bearer KEY'), or keep --host 127.0.0.1")
        return self


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
