"""The DICOM node's HTTP face: the worklist, a study's preview, questions about a study, drafts.

    GET  /v1/studies                    the worklist (patient values only for a keyed request)
    GET  /v1/studies/{uid}              one study
    GET  /v1/studies/{uid}/preview.png  what the model sees of it (a labelled contact sheet)
    POST /v1/results {"completion_id"}  store a recent answer about a study as a draft SR
    GET  /v1/results/{id}               that draft's state (queued, sending, sent, failed)

Patient values (name, ID, accession, study date and description) go only to a request that
carried the server's API key: the middleware has refused every other request already when the
server has one, so "the server has a key" is that test; without a key nobody is authenticated.

A chat naming a study (server/translate.py resolves the parts) runs as `study_run`: the study's
files stay in the spool while it is answered; when it was not prepared, its progress (images
encoded, prompt evaluated) reaches the stream before the first token as any image question's does
(server/chat.py, docs/server.md#progress). The server keeps the question and answer of its last
RECENT answers about a study, in memory only, so the kiosk can store one after the fact.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import anyio.to_thread
from cachetools import LRUCache
from starlette.responses import JSONResponse, Response

from medgemma_edge.node.studies import STUDY, study_entry
from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.preprocess import IMAGE_SIZE
from medgemma_edge.server.errors import ApiError, response_for
from medgemma_edge.server.http import read_json

RECENT = 64  # answers about a study kept for POST /v1/results
PREVIEWS = 8  # study previews kept (patient pixels, in memory only)
NO_NODE = "this server has no DICOM node — start `medgemma-edge serve` with --dicom-port PORT"


@dataclass(frozen=True)
class Answer:
    question: str
    answer: str
    study_uid: str


class RecentAnswers:
    """The last `size` answers about a study by completion id, least recently used out first.
    Thread-safe (cachetools' caches are not: the lock)."""

    def __init__(self, size: int = RECENT):
        self.size = size
        self._items: LRUCache = LRUCache(size)
        self._lock = threading.Lock()

    def add(self, completion_id: str, answer: Answer) -> None:
        with self._lock:
            self._items[completion_id] = answer

    def get(self, completion_id) -> Answer | None:
        with self._lock:
            return self._items.get(completion_id) if isinstance(completion_id, str) else None


# -- routes ----------------------------------------------------------------------------------------
async def list_studies(request):
    try:
        node, auth = _node(request), _authenticated(request)
        rows = await anyio.to_thread.run_sync(node.book.worklist, auth)  # classifying reads headers
    except Exception as err:
        return response_for(err)
    return JSONResponse({"object": "list", "data": rows}, headers={"Cache-Control": "no-store"})


async def get_study(request):
    try:
        node, study = _study(request)
        auth = _authenticated(request)

        def entry():
            node.book.classify(study)
            return study_entry(study, auth)

        return JSONResponse(await anyio.to_thread.run_sync(entry), headers={"Cache-Control": "no-store"})
    except Exception as err:
        return response_for(err)


async def study_preview(request):
    server = request.app.state.medgemma
    try:
        node, study = _study(request)
        size = getattr(server.backend, "image_size", None) or IMAGE_SIZE
        png = await anyio.to_thread.run_sync(server.previews.get, node, study, size)
    except Exception as err:
        return response_for(err)
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


async def create_result(request):
    server = request.app.state.medgemma
    try:
        node = _results_node(server)
        body = await read_json(request)
        completion_id = body.get("completion_id") if isinstance(body, dict) else None
        if not isinstance(completion_id, str):
            raise ApiError(400, "send {\"completion_id\": ID}, the id of an answer about a study", "completion_id")
        answer = server.answers.get(completion_id)
        if answer is None:
            raise ApiError(404, f"no recent answer about a study with this id (the server keeps the last "
                                f"{server.answers.size}, in memory only) — ask again", "completion_id")
        status = await anyio.to_thread.run_sync(lambda: store(server, node, answer))
    except Exception as err:
        return response_for(err)
    return JSONResponse({**status, "completion_id": completion_id})


async def get_result(request):
    server = request.app.state.medgemma
    try:
        node = _results_node(server)
        status = node.result_status(request.path_params["result_id"])
        if status is None:
            raise ApiError(404, "no draft with this id on this node (sent drafts are forgotten at a restart)")
    except Exception as err:
        return response_for(err)
    return JSONResponse(status)


# -- helpers the chat route uses ---------------------------------------------------------------
def store(server, node, answer: Answer) -> dict:
    """Queue `answer` as a draft SR (blocking: run it off the event loop); the draft's status."""
    backend = server.require_backend()
    status = node.store_result(answer.question, answer.answer, answer.study_uid, model_name=backend.model_id,
                               model=getattr(backend, "model", None))
    return status


def check_store(chat, node) -> None:
    """400 now, before the answer, when `store_result` cannot be honoured."""
    if not chat.store_result:
        return
    if node is None or node.outbox is None:
        raise ApiError(400, "store_result needs a node that sends drafts — start `serve` with --dicom-port and "
                            "--results-to AE@HOST:PORT or --dicomweb URL", "medgemma_edge.store_result")
    if len(set(chat.studies)) != 1:
        raise ApiError(400, "store_result stores an answer about one study — name exactly one "
                            "(medgemma-edge:study/UID) in the messages", "medgemma_edge.store_result")


def question_text(messages: list[dict]) -> str:
    """The last user turn's text (what the draft records as the question)."""
    for message in reversed(messages):
        if message["role"] == "user":
            content = message["content"]
            if isinstance(content, str):
                return content.strip()
            return "\n".join(i["text"].strip() for i in content if i.get("type") == "text").strip()
    return ""


def study_run(backend, chat, node):
    """`run(cancelled)` for the worker: the answer, with the named studies' files pinned in the
    spool while it runs."""

    def run(cancelled):
        return _pinned(backend.chat(chat.messages, chat.options, cancelled), node, set(chat.studies))

    return run


def _pinned(items, node, uids):
    with contextlib.ExitStack() as stack:
        for uid in sorted(uids):
            stack.enter_context(node.spool.pinned(uid))
        try:
            yield from items
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()


async def prefetch(body, node) -> None:
    """Pull the studies a chat names that this node lacks from its --dicomweb server (off the
    event loop), before the request is translated. A PACS failure is a 502, one line."""
    from medgemma_edge.node.dicomweb import PacsError

    messages = body.get("messages") if isinstance(body, dict) else None
    if node is None or not node.config.dicomweb or not isinstance(messages, list):
        return
    wanted = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else ():
            wanted += _named(part, node)
    for study_uid, series_uid, sop_uid in wanted:
        try:
            await anyio.to_thread.run_sync(lambda: node.pull(study_uid, series_uid, sop_uid))
        except PacsError as err:
            raise ApiError(502, str(err)) from None


def _named(part, node) -> list[tuple]:
    """(study, series, sop) of a chat part that this node would have to fetch."""
    from medgemma_edge.node.dicomweb import check_uid, image_dicom_sources

    if not isinstance(part, dict):
        return []
    if part.get("type") == "image_dicom":
        try:
            sources = image_dicom_sources(part, node.config.dicomweb)
        except InputError:
            return []  # translate says what is wrong with it, with the part's place
        return [s for s in sources if not _held(node, *s)]
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if part.get("type") == "image_url" and isinstance(url, str) and url.startswith(STUDY):
        uid = url[len(STUDY):]
        try:
            check_uid(uid, "the study UID")
        except InputError:
            return []
        return [] if node.knows(uid) else [(uid, None, None)]
    return []


def _held(node, study_uid, series_uid, sop_uid) -> bool:
    if sop_uid is not None:
        return node.spool.get(sop_uid) is not None
    if series_uid is not None:
        return node.knows(series_uid, series=True)
    return node.knows(study_uid)


class Previews:
    """The last PREVIEWS study contact sheets, by study and instance count (a study that grew is
    drawn again)."""

    def __init__(self, size: int = PREVIEWS):
        self._items: LRUCache = LRUCache(size)
        self._lock = threading.Lock()

    def get(self, node, study, image_size: int) -> bytes:
        key = (study.uid, len(study.instances))
        with self._lock:
            png = self._items.get(key)
        if png is None:
            png = study_png(node, study, image_size)
            with self._lock:
                self._items[key] = png
        return png


def study_png(node, study, image_size: int) -> bytes:
    """The readable series' pictures (as the model gets them) on one labelled sheet."""
    from dataclasses import replace

    from medgemma_edge.runtime.sources import load_pictures
    from medgemma_edge.server.images import sheet_png

    node.book.classify(study)
    series = study.readable_series()
    if not series:
        raise InputError("this study holds no series the model reads — GET /v1/studies/UID says why")
    pictures = []
    for s in series:
        found = load_pictures(s.source(), max_slices=node.config.max_slices)
        if len(series) > 1:  # say which series each tile is from
            found = [replace(p, label=" ".join(x for x in (f"S{s.number if s.number is not None else '?'}",
                                                            p.label) if x)) for p in found]
        pictures += found
    return sheet_png(pictures, image_size, None)


def _node(request):
    node = request.app.state.medgemma.node
    if node is None:
        raise ApiError(404, NO_NODE)
    return node


def _results_node(server):
    node = server.node
    if node is None or node.outbox is None:
        raise ApiError(400, "this server sends drafts nowhere — start `serve` with --dicom-port and --results-to "
                            "AE@HOST:PORT or --dicomweb URL")
    return node


def _study(request):
    node = _node(request)
    study = node.book.study(request.path_params["study_uid"])
    if study is None:
        raise ApiError(404, "no study with this UID on this node — GET /v1/studies lists what it holds")
    return node, study


def _authenticated(request) -> bool:
    return request.app.state.medgemma.config.api_key is not None

