"""What the DICOM node may do: its AE title, bind address, who may send, spool limits, where drafts
go. One frozen dataclass built from `serve` flags, checked before anything listens."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.picture import DEFAULT_MAX_SLICES
from medgemma_edge.server.config import is_loopback

# DICOM AE titles: up to 16 characters of the default repertoire, no backslash or control characters
# (PS3.5 6.2, AE VR); leading/trailing spaces are not significant, so they are stripped first.
_AE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")


@dataclass(frozen=True)
class Peer:
    """Another DICOM node: AE title, host, and (for one we call) its port."""
    ae: str
    host: str
    port: int | None = None

    def __str__(self) -> str:
        return f"{self.ae}@{self.host}" + (f":{self.port}" if self.port is not None else "")


def check_ae(ae: str, what: str = "AE title") -> str:
    """The AE title stripped, or InputError naming the rule."""
    text = ae.strip() if isinstance(ae, str) else ""
    if not _AE.fullmatch(text):
        raise InputError(f"{what} {str(ae)!r:.40} is not a DICOM AE title — 1 to 16 printable ASCII "
                         "characters, no backslash (e.g. MGE)")
    return text


def parse_peer(text: str, *, port: bool | None = None) -> Peer:
    """`AE@HOST[:PORT]` → Peer. port=True: the port is required (a peer we send to); port=False: no
    port allowed (an allow-list entry); None: either. InputError, one line, otherwise."""
    ae, sep, rest = (text or "").rpartition("@")
    if not sep or not ae or not rest:
        raise InputError(f"{text!r:.60} is not AE@HOST[:PORT] — e.g. ORTHANC@127.0.0.1:4242")
    ae = check_ae(ae)
    host, number = rest, None
    if rest.startswith("["):  # an IPv6 address in brackets, maybe followed by :PORT
        close = rest.find("]")
        host, tail = rest[:close + 1], rest[close + 1:]
        if close < 0 or (tail and not tail.startswith(":")):
            raise InputError(f"{text!r:.60}: an IPv6 host goes in brackets, e.g. MGE@[::1]:4242")
        number = tail[1:] if tail else None
    elif ":" in rest:
        host, _, number = rest.rpartition(":")
    if not _HOST.fullmatch(host):
        raise InputError(f"{text!r:.60}: {host!r:.40} is not a host name or address")
    value = None
    if number is not None:
        if not number.isdigit() or not 0 < int(number) < 65536:
            raise InputError(f"{text!r:.60}: the port must be a number from 1 to 65535")
        value = int(number)
    if port is True and value is None:
        raise InputError(f"{text!r:.60} names no port — give AE@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242")
    if port is False and value is not None:
        raise InputError(f"{text!r:.60}: an allowed sender is AE@HOST, without a port (it calls from any port)")
    return Peer(ae, host.strip("[]") if host.startswith("[") else host, value)


@dataclass(frozen=True)
class NodeConfig:
    port: int
    ae_title: str = "MGE"
    host: str = "127.0.0.1"  # the DIMSE listener binds `serve --host`, like HTTP
    allow: tuple[Peer, ...] = ()  # senders let in (AE and host both match); empty: anyone who reaches the port
    spool: Path | None = None  # received instances; default cache_root()/"node-spool"
    spool_gb: float = 20.0  # a full spool answers C-STORE "out of resources", deleting nothing
    stable_s: float = 10.0  # a study with no new instance for this long is prepared
    prepare: str = "auto"  # auto | off
    results_to: Peer | None = None  # DIMSE peer drafts are stored to (C-STORE)
    dicomweb: str | None = None  # DICOMweb base URL: STOW-RS drafts, QIDO/WADO pulls
    audit_log: Path | None = None
    max_slices: int = DEFAULT_MAX_SLICES
    max_age_days: float = 30.0  # spool files older than this are pruned (studies not in use)

    @property
    def spool_dir(self) -> Path:
        if self.spool is not None:
            return Path(self.spool)
        from medgemma_edge.runtime.cache import cache_root
        return cache_root() / "node-spool"

    @property
    def spool_bytes(self) -> int:
        return int(self.spool_gb * (1 << 30))

    def check(self) -> "NodeConfig":
        """InputError naming the first setting the node cannot run with; the config otherwise."""
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 <= self.port < 65536:
            raise InputError(f"--dicom-port must be a port number from 1 to 65535 (0: any free port), got {self.port!r:.20}")
        check_ae(self.ae_title, "--dicom-ae")
        if isinstance(self.allow, (str, Peer)) or not all(isinstance(p, Peer) for p in self.allow):
            raise InputError("allow must be a tuple of Peer (parse_peer('AE@HOST'))")
        if not self.spool_gb > 0:
            raise InputError(f"--spool-gb must be positive, got {self.spool_gb!r:.20}")
        if not self.stable_s >= 0:
            raise InputError(f"--stable-s must be zero or more seconds, got {self.stable_s!r:.20}")
        if self.prepare not in ("auto", "off"):
            raise InputError(f"--prepare must be auto or off, got {self.prepare!r:.20}")
        if self.results_to is not None and (not isinstance(self.results_to, Peer) or self.results_to.port is None):
            raise InputError("--results-to needs AE@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242")
        if self.dicomweb is not None:
            if not re.match(r"https?://[^/\s]+", str(self.dicomweb)):
                raise InputError(f"--dicomweb {str(self.dicomweb)!r:.80} is not an http(s) URL — "
                                 "e.g. http://127.0.0.1:8042/dicom-web")
            from medgemma_edge.node.dicomweb import check_base_url  # credentials, query, `..`: refused now

            check_base_url(self.dicomweb)
        if not isinstance(self.max_slices, int) or isinstance(self.max_slices, bool) or self.max_slices < 1:
            raise InputError(f"max_slices must be a positive integer, got {self.max_slices!r:.20}")
        if not self.max_age_days > 0:
            raise InputError(f"max_age_days must be positive, got {self.max_age_days!r:.20}")
        # Anyone who can reach a non-loopback port could store into the spool (and fill it).
        if not is_loopback(self.host) and not self.allow:
            raise InputError(f"--host {self.host} makes the DICOM port reachable from other machines: "
                             "name the senders with --dicom-allow AE@HOST (repeatable), or keep --host 127.0.0.1")
        return self
