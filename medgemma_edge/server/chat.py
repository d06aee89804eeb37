"""POST /v1/chat/completions: one answer, joined or streamed as server-sent events.

Both forms read the same stream of `Response`s from the worker; the plain answer is the streamed
one joined (STYLE: no side channels). A streamed answer starts once the first piece exists, so an
input error (a corrupt image, a prompt longer than the context) still gets its 400, not a 200
carrying an error event.

With `tools` (server/tools.py) an answer that is a call comes back as `tool_calls`, finish_reason
"tool_calls"; streamed, a call is held back and sent as one chunk once complete, while a plain
answer (under tool_choice "auto", one not starting with `{`) streams as usual.

An answer holding `box_2d` about the request's one picture (not a series) also gets `boxes` on the
message (streamed: on the final chunk's delta), each box also in pixels of the picture as sent
(runtime/boxes.py). OpenAI's clients keep such unknown fields (`model_extra`).
"""

from __future__ import annotations

import json
import logging
import secrets
import time

import anyio.to_thread
from starlette.responses import JSONResponse

from medgemma_edge.runtime.boxes import answer_boxes
from medgemma_edge.runtime.picture import DEFAULT_MAX_SLICES
from medgemma_edge.runtime.preprocess import DEFAULT_FIT
from medgemma_edge.server.errors import ApiError, as_api_error, error_body, response_for
from medgemma_edge.server.state import read_json, watch_disconnect
from medgemma_edge.server.translate import chat_request
from medgemma_edge.server.worker import DONE

log = logging.getLogger("medgemma_edge.server")
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]  # a proxy in front must not hold tokens back


async def chat_completions(request):
    server = request.app.state.medgemma
    try:
        body = await read_json(request)
        chat = chat_request(body, server.uploads, max_images=server.config.max_images,
                            max_tokens=server.config.max_tokens)
        backend = server.require_backend()
        job = server.submit(lambda cancelled: backend.chat(chat.messages, chat.options, cancelled))
    except Exception as err:
        return response_for(err)
    watcher = watch_disconnect(request, server.worker, job)
    meta = _Meta(backend.model_id, getattr(backend, "notice", None))
    locate = lambda content: _boxes(chat, backend, content)
    streaming = False  # once the EventStream owns the job, it closes it
    try:
        first = await job.next()
        if first is DONE:  # cancelled before it began: the client has gone
            raise ApiError(503, "the request was cancelled before it was answered")
        if chat.stream:
            streaming = True
            return EventStream(_events(job, first, meta, chat.include_usage, chat.tools, locate),
                               lambda: _close(server, job, watcher))
        return JSONResponse(await _joined(job, first, meta, chat.tools, locate))
    except Exception as err:
        return response_for(err, server.worker.retry_after())
    finally:
        if not streaming:
            _close(server, job, watcher)


class _Meta:
    def __init__(self, model_id: str, notice: str | None):
        self.id, self.created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
        self.model, self.notice = model_id, notice

    def extras(self, last) -> dict:
        stats = last.stats.as_dict() if last.stats is not None else None
        return {"stats": stats, "thought": last.thought, "notice": self.notice}

    def chunk(self, delta: dict, finish_reason=None, **extra) -> bytes:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}], **extra}
        return sse(body)


def usage(last) -> dict:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens}


def sse(body) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"


async def _boxes(chat, backend, content: str) -> list[dict] | None:
    """The answer's box_2d entries on the request's one picture, with its [W, H]; None without."""
    options = chat.options
    fit = options.get("fit") or getattr(backend, "fit", None) or DEFAULT_FIT  # the fit the view was made with
    find = lambda: answer_boxes(chat.messages, content, fit, window=options.get("window"),
                                max_slices=options.get("max_slices", DEFAULT_MAX_SLICES))
    try:
        boxes, size = await anyio.to_thread.run_sync(find)
    except Exception as err:  # the picture decoded once already for the answer; an extra field is not worth a 500
        log.warning("box_2d answer not mapped to the picture: %s", type(err).__name__)
        return None
    return [{**box.as_dict(), "image_size": list(size)} for box in boxes] or None


def _as_call(tools, text: str, finish_reason: str):
    """(tool_calls entry or None, finish_reason) for a finished answer."""
    call = tools.read_call(text) if tools is not None and finish_reason == "stop" else None
    return call, ("tool_calls" if call is not None else finish_reason)


async def _joined(job, item, meta: _Meta, tools=None, locate=None) -> dict:
    pieces, last = [], None
    while item is not DONE:
        pieces.append(item.text)
        if item.finish_reason is not None:
            last = item
        item = await job.next()
    if last is None:
        raise ApiError(503, "the answer was cancelled before it finished")
    content = "".join(pieces)
    call, finish_reason = _as_call(tools, content, last.finish_reason)
    message = {"role": "assistant", "content": content} if call is None else {
        "role": "assistant", "content": None, "tool_calls": [call]}
    boxes = await locate(content) if call is None and locate is not None else None
    if boxes:
        message["boxes"] = boxes
    return {"id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(last), "medgemma_edge": meta.extras(last)}


async def _events(job, item, meta: _Meta, include_usage: bool, tools=None, locate=None):
    extra = {"usage": None} if include_usage else {}
    yield meta.chunk({"role": "assistant", "content": ""}, **extra)
    last, held = None, None if tools is None else ""  # held: text kept back while it may be a call
    pieces = []
    try:
        while item is not DONE:
            pieces.append(item.text)
            if held is not None and item.text:
                held += item.text
                if held.lstrip() and not held.lstrip().startswith("{"):  # a plain answer: stream it
                    yield meta.chunk({"content": held}, **extra)
                    held = None
            elif item.text:
                yield meta.chunk({"content": item.text}, **extra)
            if item.finish_reason is not None:
                last = item
            item = await job.next()
    except Exception as err:  # after the 200 went out: OpenAI's clients raise on an error event
        api = as_api_error(err)
        yield sse(error_body(api.status, api.message, api.param))
        return
    if last is None:  # cancelled: nobody is reading
        return
    finish_reason, call = last.finish_reason, None
    if held:
        call, finish_reason = _as_call(tools, held, finish_reason)
        delta = {"content": held} if call is None else {"tool_calls": [{"index": 0, **call}]}
        yield meta.chunk(delta, **extra)
    boxes = await locate("".join(pieces)) if call is None and locate is not None else None
    yield meta.chunk({"boxes": boxes} if boxes else {}, finish_reason, medgemma_edge=meta.extras(last), **extra)
    if include_usage:
        yield sse({"id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model,
                   "choices": [], "usage": usage(last)})
    yield b"data: [DONE]\n\n"


def _close(server, job, watcher) -> None:
    watcher.cancel()
    server.worker.cancel(job)  # frees the model at the next token if the answer is still running


class EventStream:
    """An SSE response that always cancels its job when it ends, however it ends (finished, client
    gone, server stopping); the disconnect watcher covers a client that leaves between tokens."""

    def __init__(self, events, on_close):
        self.events, self.on_close = events, on_close

    async def __call__(self, scope, receive, send):
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client closed the connection while we wrote
            pass
        finally:
            self.on_close()
            await self.events.aclose()

