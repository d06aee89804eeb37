"""Pull studies from the site's DICOMweb server (`serve --dicomweb URL`) into the node's spool,
and read the content part Google's MedGemma serving container takes,
`{"type": "image_dicom", "image_dicom": {"dicom_source": [URI, …]}}`.

    fetch_study(base_url, study_uid, spool, series_uid=None, sop_uid=None) -> list[Instance]
    image_dicom_sources(part, base_url) -> [(study_uid, series_uid | None, sop_uid | None), …]

Listing is QIDO-RS (instances of the study, paged by offset), retrieval WADO-RS one instance at a
time in the transfer syntax it is stored in (`application/dicom; transfer-syntax=*`), both through
dicomweb_client. One instance at a time keeps every answer bounded on its own (instance count, bytes
per answer, bytes per study) and lets a fetch skip the SOP instances the spool already holds.

Decisions (NODE_DESIGN.md is silent on them):
- The node only ever talks to the configured server: the session ignores the environment (no proxy
  variables, no .netrc credentials) and follows no redirect; an image_dicom URI is only read for its
  UIDs, never fetched as given, and must lie under the configured URL (same scheme, host, port and
  path prefix) anyway, so an app cannot learn or probe another host through the node.
- Errors: the client's fault is InputError (a URI elsewhere or malformed, a bad UID, a study larger
  than the bounds), StudyNotFound (an InputError) for a study, series or instance the server does not
  have, PacsError for the server's fault (unreachable, an HTTP error, an answer that is not DICOMweb
  JSON or not the DICOM instance asked for). Messages name the server by scheme://host:port, never a
  UID or a patient value; dicomweb_client's own log lines (which print UIDs) are silenced.
- A fetch that stops half-way (a bound, the server) keeps the instances already spooled: they are
  complete, acknowledged data, pruned by the spool's policy; fetching again skips them.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from medgemma_edge.runtime.errors import InputError, MedGemmaEdgeError
from medgemma_edge.runtime.files import MAX_FILE_BYTES

MAX_INSTANCES = 5000  # a study with more is an archive dump, not something to ask one question about
MAX_STUDY_BYTES = 8 << 30  # every instance of one fetch together
MAX_INSTANCE_BYTES = MAX_FILE_BYTES  # the runtime reads no larger file
MAX_JSON_BYTES = 64 << 20  # one QIDO-RS page (about 2 kB a listed instance)
MAX_SOURCES = 256  # URIs in one image_dicom part
TIMEOUT_S = (5.0, 120.0)  # connect, read (between bytes): a PACS pulling from its archive is slow
RETRIES = 3  # attempts for 429/503/504 answers (with dicomweb_client's own growing backoff between them)

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")  # PS3.5 9.1, as dicomweb_client checks it
_MAX_UID = 64
_WHAT = "a DICOMweb URI: BASE/studies/UID, BASE/studies/UID/series/UID or …/series/UID/instances/UID"
_SOP_CLASS, _SOP_UID, _SERIES_UID, _STUDY_UID = "00080016", "00080018", "0020000E", "0020000D"

# dicomweb_client logs every UID it asks for at INFO and the server's Warning header at WARNING;
# urllib3 logs each request's path (UIDs again) at DEBUG: those lines are dropped, nothing else.
logging.getLogger("dicomweb_client").setLevel(logging.ERROR)
logging.getLogger("urllib3.connectionpool").addFilter(
    lambda record: "/studies/" not in str(record.msg) + str(record.args))


class PacsError(MedGemmaEdgeError):
    """The DICOMweb server failed: it does not answer, answers an HTTP error, or answers something
    that is not what DICOMweb promises. The server's fault, not the client's (HTTP 502)."""


class StudyNotFound(InputError):
    """The DICOMweb server has no such study, series or instance (HTTP 404)."""


@dataclass(frozen=True)
class _Base:
    """The configured DICOMweb URL, split the way URIs are compared with it."""
    url: str  # as given, without a trailing slash
    scheme: str
    host: str
    port: int
    path: tuple[str, ...]  # decoded path segments

    @property
    def shown(self) -> str:
        """The server as messages name it: no path, no credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def check_uid(uid, what: str = "UID") -> str:
    """`uid` when it is a DICOM UID (digits and dots, at most 64 characters); InputError otherwise."""
    if not isinstance(uid, str) or len(uid) > _MAX_UID or not _UID.fullmatch(uid):
        raise InputError(f"{what} is not a DICOM UID (digits and dots, at most 64 characters)")
    return uid


def _split(url: str, what: str) -> tuple:
    """(scheme, host, port, decoded path segments, query, fragment, has user info) of an http(s) URL;
    InputError for what cannot be compared safely: control characters, `.`/`..`, encoded slashes."""
    if not isinstance(url, str) or not url or len(url) > 4096:
        raise InputError(f"{what} must be an http(s) URL")
    if any(c <= " " or c == "\x7f" or c == "\\" or not c.isascii() for c in url):
        raise InputError(f"{what} holds a space, a backslash, a control or a non-ASCII character")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"{what} must be an http(s) URL with a host")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise InputError(f"{what} has a port that is not a number from 1 to 65535") from None
    segments = parts.path.split("/")[1:] if parts.path else []
    if segments and segments[-1] == "":
        segments.pop()  # one trailing slash
    decoded = []
    for raw in segments:
        seg = unquote(raw, errors="strict") if "%" in raw else raw
        if seg in ("", ".", "..") or "/" in seg or "%" in seg or "\\" in seg or any(c < " " for c in seg):
            raise InputError(f"{what} has an empty, '.', '..' or encoded-slash path segment")
        decoded.append(seg)
    return scheme, parts.hostname.lower().rstrip("."), port, decoded, parts.query, parts.fragment, "@" in parts.netloc


def check_base_url(base_url: str) -> str:
    """`base_url` when the node can use it as its --dicomweb root (http(s), a host, no credentials,
    no query, no `..`); InputError, one line, otherwise. For checking the flag before anything runs."""
    _base(base_url)
    return base_url


def _base(base_url: str | None) -> _Base:
    if not base_url:
        raise InputError("this node has no DICOMweb server: start `serve` with --dicomweb URL "
                         "(e.g. http://127.0.0.1:8042/dicom-web)")
    try:
        scheme, host, port, path, query, fragment, userinfo = _split(base_url, "--dicomweb")
    except UnicodeDecodeError:
        raise InputError("--dicomweb has a percent-encoding that is not UTF-8") from None
    if userinfo:
        raise InputError("--dicomweb carries credentials (user@host): the node sends none; remove them")
    if query or fragment:
        raise InputError("--dicomweb must be the DICOMweb root URL, without ?query or #fragment")
    return _Base(base_url.rstrip("/"), scheme, host, port, tuple(path))


def image_dicom_sources(part, base_url: str | None, param: str = "image_dicom") -> list[tuple]:
    """(study_uid, series_uid or None, sop_uid or None) for each URI of Google's content part
    `{"type": "image_dicom", "image_dicom": {"dicom_source": [URI, …]}}` (a single URI string is
    taken too). Every URI must lie under `base_url` — same scheme, host, port and path prefix —
    else InputError ("this node fetches from no other host"); the server answers it with a 400.
    Other keys of image_dicom (Google's access_credential) are ignored: the node sends no credential."""
    base = _base(base_url)
    body = part.get("image_dicom") if isinstance(part, dict) else None
    sources = body.get("dicom_source") if isinstance(body, dict) else None
    if isinstance(sources, str):
        sources = [sources]
    if not isinstance(sources, list) or not sources:
        raise InputError(f"{param}.dicom_source must be a list of DICOMweb URIs "
                         f"(e.g. {base.url}/studies/1.2.3)")
    if len(sources) > MAX_SOURCES:
        raise InputError(f"{param}.dicom_source lists {len(sources)} URIs; at most {MAX_SOURCES} in one part")
    return [_source(uri, base, f"{param}.dicom_source[{i}]") for i, uri in enumerate(sources)]


def _source(uri, base: _Base, what: str) -> tuple:
    """The UIDs one URI names, after checking that it lies under the configured server."""
    try:
        scheme, host, port, path, query, fragment, userinfo = _split(uri, what)
    except UnicodeDecodeError:
        raise InputError(f"{what} has a percent-encoding that is not UTF-8") from None
    if (scheme, host, port) != (base.scheme, base.host, base.port) or tuple(path[:len(base.path)]) != base.path:
        raise InputError(f"{what} is not on this node's DICOMweb server ({base.url}): "
                         "this node fetches from no other host")
    if userinfo:
        raise InputError(f"{what} carries credentials (user@host): the node sends none; remove them")
    if query or fragment:
        raise InputError(f"{what} has a ?query or #fragment; give {_WHAT}")
    rest = path[len(base.path):]
    if len(rest) not in (2, 4, 6) or rest[0::2] != ["studies", "series", "instances"][:len(rest) // 2]:
        raise InputError(f"{what} names no study, series or instance; give {_WHAT}")
    uids = [check_uid(u, f"{what}: {kind}") for u, kind in zip(rest[1::2], ("the study", "the series", "the instance"))]
    return tuple(uids + [None] * (3 - len(uids)))


# -- fetching --------------------------------------------------------------------------------------
class _TooLarge(Exception):
    """An answer passed its byte bound (raised inside requests, turned into InputError here)."""


def _bounded(limit: list[int]):
    """A requests response hook reading the body itself, at most limit[0] bytes (a mutable cell so
    each request can set its own bound); more raises _TooLarge before the rest is read."""
    def hook(response, *args, **kwargs):
        if response.status_code >= 400:
            return response  # error bodies are small or not read
        cap, body = limit[0], bytearray()
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > cap:
            response.close()
            raise _TooLarge(cap)
        for chunk in response.iter_content(1 << 20):
            body += chunk
            if len(body) > cap:
                response.close()
                raise _TooLarge(cap)
        response._content, response._content_consumed = bytes(body), True  # what .content returns
        return response
    return hook


def _client(base: _Base, session, limit: list[int]):
    import dicomweb_client

    session.trust_env = False  # no proxy from the environment, no .netrc credentials
    session.max_redirects = 0  # a redirect could lead to another host
    # identity: the byte bounds count what is stored, and no gzip answer can inflate past them
    session.headers.update({"Accept-Encoding": "identity", "User-Agent": "medgemma-edge"})
    client = dicomweb_client.DICOMwebClient(base.url, session=session, callback=_bounded(limit),
                                            timeout=TIMEOUT_S)
    client.set_http_retry_params(max_attempts=RETRIES, wait_exponential_multiplier=250)
    return client


def _value(item: dict, tag: str):
    try:
        return item[tag]["Value"][0]
    except (KeyError, IndexError, TypeError):
        return None


def _listing(client, base: _Base, study: str, series: str | None, max_instances: int,
             limit: list[int]) -> list[tuple[str, str]]:
    """(series_uid, sop_uid) of every instance QIDO-RS lists, in its order, paged by offset (a server
    may answer in pages); InputError past max_instances, PacsError for a page that is not a list
    of instances."""
    limit[0] = MAX_JSON_BYTES
    found: dict[str, str] = {}
    listed = 0  # results the server sent so far: the next page's offset
    while True:
        page = client.search_for_instances(study, series, offset=listed or None,
                                           fields=[_SOP_CLASS, _SERIES_UID, _SOP_UID])
        if not isinstance(page, list) or not all(isinstance(i, dict) for i in page):
            raise PacsError(f"the DICOMweb server at {base.shown} answered QIDO-RS with something that "
                            "is not a list of instances")
        new, listed = 0, listed + len(page)
        for item in page:
            sop, ser = _value(item, _SOP_UID), _value(item, _SERIES_UID) or series
            if not (isinstance(sop, str) and isinstance(ser, str) and _UID.fullmatch(sop) and _UID.fullmatch(ser)):
                raise PacsError(f"the DICOMweb server at {base.shown} listed an instance without valid "
                                "SOP Instance and Series Instance UIDs")
            if series is not None and ser != series:
                continue
            if sop not in found:
                found[sop] = ser
                new += 1
        if len(found) > max_instances:
            raise InputError(f"the study has more than {max_instances} instances, more than the node fetches "
                             "at once; ask about one series (…/studies/UID/series/UID)")
        if not new:  # an empty page, or a server that ignores offset and repeats itself
            return [(ser, sop) for sop, ser in found.items()]


def _retrieve(client, base: _Base, study: str, series: str, sop: str) -> bytes:
    """One instance as WADO-RS sends it (its stored transfer syntax), as a DICOM file's bytes;
    PacsError unless it is a DICOM dataset with the UIDs asked for."""
    import pydicom

    ds = client.retrieve_instance(study, series, sop, media_types=(("application/dicom", "*"),))
    if not isinstance(ds, pydicom.Dataset):
        raise PacsError(f"the DICOMweb server at {base.shown} answered WADO-RS without a DICOM file")
    if (ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID"), ds.get("SOPInstanceUID")) != (study, series, sop):
        raise PacsError(f"the DICOMweb server at {base.shown} sent an instance other than the one asked for")
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=False)  # as read: preamble, file meta, encoding
    return out.getvalue()


def fetch_study(base_url: str, study_uid: str, spool, *, series_uid: str | None = None,
                sop_uid: str | None = None, max_instances: int = MAX_INSTANCES,
                max_bytes: int = MAX_STUDY_BYTES) -> list:
    """Every instance of the study (or of one series, or the one instance) on the DICOMweb server
    at `base_url`, stored through `spool.put(bytes) -> Instance`; the spool's Instances in the
    server's listing order (instances the spool already holds are not fetched again).

    InputError: a bad UID, more than max_instances or max_bytes; StudyNotFound: the server has no
    such study/series/instance; PacsError: the server does not answer or answers nonsense;
    the spool's own errors (SpoolFull) pass through."""
    import requests
    from pydicom.errors import InvalidDicomError

    base = _base(base_url)
    check_uid(study_uid, "the study UID")
    if series_uid is not None:
        check_uid(series_uid, "the series UID")
    if sop_uid is not None:
        if series_uid is None:
            raise InputError("an instance is named with its series: …/series/UID/instances/UID")
        check_uid(sop_uid, "the instance UID")
    limit = [MAX_JSON_BYTES]
    session = requests.Session()
    client = _client(base, session, limit)
    try:
        if sop_uid is not None:
            listing = [(series_uid, sop_uid)]
        else:
            listing = _listing(client, base, study_uid, series_uid, max_instances, limit)
        if not listing:
            raise StudyNotFound(f"the DICOMweb server at {base.shown} has no such "
                                f"{'series' if series_uid else 'study'}")
        have = {i.sop_uid: i for i in spool.instances(study_uid)}
        out, total = [], 0
        for ser, sop in listing:
            if sop in have:
                out.append(have[sop])
                continue
            limit[0] = min(MAX_INSTANCE_BYTES, max_bytes - total)
            if limit[0] <= 0:
                raise _TooLarge(max_bytes)
            data = _retrieve(client, base, study_uid, ser, sop)
            total += len(data)
            out.append(spool.put(data))
        return out
    except _TooLarge:
        raise InputError(f"the study is larger than the node fetches at once ({max_bytes / 2**30:.3g} GiB, "
                         f"{MAX_INSTANCE_BYTES / 2**30:.3g} GiB an instance); ask about one series") from None
    except requests.HTTPError as err:
        code = err.response.status_code if err.response is not None else 0
        if code == 404:
            raise StudyNotFound(f"the DICOMweb server at {base.shown} has no such "
                                f"{'instance' if sop_uid else 'series' if series_uid else 'study'}") from None
        why = " (it wants credentials; the node sends none)" if code in (401, 403) else ""
        raise PacsError(f"the DICOMweb server at {base.shown} answered HTTP {code}{why}") from None
    except requests.TooManyRedirects:
        raise PacsError(f"the DICOMweb server at {base.shown} redirected elsewhere; give --dicomweb the URL "
                        "it redirects to") from None
    except requests.Timeout:
        raise PacsError(f"the DICOMweb server at {base.shown} did not answer in time") from None
    except requests.ConnectionError:
        raise PacsError(f"the DICOMweb server at {base.shown} does not answer (is it running, and is "
                        "--dicomweb its URL?)") from None
    except (ValueError, KeyError, TypeError, IndexError, EOFError, InvalidDicomError,
            requests.RequestException) as err:
        # dicomweb_client's and pydicom's parsing errors: JSON that is not DICOM JSON, a multipart
        # answer without parts, bytes that are not DICOM
        raise PacsError(f"the DICOMweb server at {base.shown} answered something that is not DICOMweb "
                        f"({type(err).__name__})") from None
    finally:
        session.close()
