"""POST /v1/chat/completions: one answer, joined or streamed as server-sent events.

Both forms read the same stream of `Response`s from the worker; the plain answer is the streamed
one joined (STYLE: no side channels). A streamed answer starts once the first piece exists, so an
input error (a corrupt image, a prompt longer than the context) still gets its 400, not a 200
carrying an error event.

With `tools` (server/tools.py) an answer that is a call comes back as `tool_calls`, finish_reason
"tool_calls"; streamed, a call is held back and sent as one chunk once complete, while a plain
answer (under tool_choice "auto", one not starting with `{`) streams as usual.

An answer the repetition guard stopped (runtime/repetition.py; on unless `serve
--no-repetition-guard` or the request's `"medgemma_edge": {"repetition_guard": false}`) says
finish_reason "length", the one of OpenAI's reasons its clients read as cut short, and
`medgemma_edge.finish_reason` "repetition"; its stats say the loop's period and length.

A response_format answer cut by max_tokens (or the repetition guard) is closed after its last
complete entry when not streamed (runtime/json_close.py; `medgemma_edge.stats.json_closed`); a
streamed one is sent as generated.

An answer holding `box_2d` about the request's one picture (not a series) also gets `boxes` on the
message (streamed: on the final chunk's delta), each box also in pixels of the picture as sent
(runtime/boxes.py). OpenAI's clients keep such unknown fields (`model_extra`).

Progress: before the first token of a streamed answer about images, the local model's progress
(runtime/progress.py: images encoded, prompt evaluated) arrives as chunks with an empty delta and
`medgemma_edge.progress` {"stage", "done", "total", "elapsed_s", "eta_s"}, which OpenAI's clients
keep in `model_extra` (docs/server.md#progress); a plain answer just waits.

About a study of the DICOM node (server/studies.py): a study the chat names that the node lacks is
pulled from its --dicomweb server first. The question and answer are kept (RecentAnswers) for POST
/v1/results; with `"medgemma_edge": {"store_result": true}` the answer is queued as a draft SR at
once, and `medgemma_edge.result` (on the last chunk when streamed) is the draft's status.

Size: every body is bounded by --max-body-mb (middleware.BodyLimit), an allowance sized for
images. A chat's text gets no share of it: the body's bytes outside its image data: URLs must fit
`max_text_mb` (413), and its text — every turn, with what tools add to the system turn — at most
the backend's `max_prompt_chars` (400), the most characters that could fit the context. Both
are checked before the request is queued, so an oversized prompt is never tokenized.
"""

from __future__ import annotations

import json
import secrets
import time

import anyio.to_thread
from starlette.responses import JSONResponse

from medgemma_edge.runtime.generate import CUT
from medgemma_edge.runtime.json_close import close_cut_answer
from medgemma_edge.runtime.progress import Progress
from medgemma_edge.server.errors import ApiError, as_api_error, error_body, response_for
from medgemma_edge.server.http import read_json, watch_disconnect
from medgemma_edge.server.studies import Answer, check_store, prefetch, question_text, store, study_run
from medgemma_edge.server.translate import chat_request
from medgemma_edge.server.worker import DONE

# OpenAI's clients know the finish reasons stop, length, tool_calls and content_filter only (module docstring)
OPENAI_FINISH = {"repetition": "length"}
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]  # a proxy in front must not hold tokens back


async def chat_completions(request):
    server = request.app.state.medgemma
    try:
        body = await read_json(request)
        backend = server.require_backend()
        await prefetch(body, server.node)
        chat = chat_request(body, server.uploads, max_images=server.config.max_images,
                            max_tokens=server.config.max_tokens, node=server.node,
                            repetition_guard=server.config.repetition_guard)
        check_text_size(chat, len(await request.body()), server.config, backend)
        check_store(chat, server.node)
        job = _submit(server, backend, chat)
    except Exception as err:
        return response_for(err)
    watcher = watch_disconnect(request, server.worker, job)
    meta = _Meta(backend.model_id, getattr(backend, "notice", None), _after(server, chat), server.metrics)
    streaming = False  # once the EventStream owns the job, it closes it
    try:
        first = await job.next()
        if first is DONE:  # cancelled before it began: the client has gone
            raise ApiError(503, "the request was cancelled before it was answered")
        if chat.stream:
            streaming = True
            return EventStream(_events(job, first, meta, chat.include_usage, chat.tools),
                               lambda: _close(server, job, watcher))
        schema = chat.options.get("json_schema") if chat.tools is None else None
        return JSONResponse(await _joined(job, first, meta, chat.tools, schema))
    except Exception as err:
        return response_for(err, server.worker.retry_after())
    finally:
        if not streaming:
            _close(server, job, watcher)


def _submit(server, backend, chat):
    if not chat.studies:
        return server.submit(lambda cancelled: backend.chat(chat.messages, chat.options, cancelled))
    for uid in dict.fromkeys(chat.studies):
        server.node.event("asked", uid, key_id=server.key_id)
    return server.submit(study_run(backend, chat, server.node))


def _after(server, chat):
    """What runs once a chat about a study is answered: keep it for POST /v1/results, and with
    store_result queue the draft; the extras it adds to the answer's medgemma_edge."""
    if not chat.studies:
        return None
    study_uid = chat.studies[0] if len(set(chat.studies)) == 1 else None

    async def after(completion_id: str, content: str) -> dict:
        for uid in dict.fromkeys(chat.studies):
            server.node.answered(uid)
        if study_uid is None:
            return {}
        answer = Answer(question_text(chat.messages), content, study_uid)
        server.answers.add(completion_id, answer)
        if not chat.store_result:
            return {}
        try:
            return {"result": await anyio.to_thread.run_sync(store, server, server.node, answer)}
        except Exception as err:  # the answer stands; the draft's failure is said beside it
            api = as_api_error(err)
            return {"result": {"id": None, "state": "failed", "attempts": 0, "error": api.message}}

    return after


def check_text_size(chat, body_bytes: int, config, backend) -> None:
    """413 when the body's non-image bytes pass max_text_mb; 400 when its text cannot fit the
    context (module docstring)."""
    if body_bytes - chat.image_bytes > config.max_text_bytes:
        raise ApiError(413, f"the request's text (everything but its images) is larger than this server's "
                            f"limit of {config.max_text_mb:g} MB — no model context holds that much text")
    limit = getattr(backend, "max_prompt_chars", None)
    chars = sum(_text_chars(m["content"]) for m in chat.messages)
    if limit is not None and chars > limit:
        raise ApiError(400, f"the prompt's text is {chars} characters; more than {limit} cannot fit this model's "
                            "context — shorten the question or the conversation", "messages")


def _text_chars(content) -> int:
    if isinstance(content, str):
        return len(content)
    return sum(len(item.get("text") or "") for item in content if item.get("type") == "text")


class _Meta:
    def __init__(self, model_id: str, notice: str | None, after=None, metrics=None):
        self.id, self.created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
        self.model, self.notice, self.after, self.metrics = model_id, notice, after, metrics

    def record(self, last) -> None:
        """The finished answer's stats into /metrics (server/metrics.py), when it is on."""
        if self.metrics is not None:
            self.metrics.record(last)

    async def finished(self, content: str | None) -> dict:
        """The extras `after` adds once the answer is whole (None: a tool call, nothing to keep)."""
        if self.after is None or content is None:
            return {}
        return await self.after(self.id, content)

    def extras(self, last) -> dict:
        stats = last.stats.as_dict() if last.stats is not None else None
        ours = {"finish_reason": last.finish_reason} if last.finish_reason in OPENAI_FINISH else {}
        return {"stats": stats, "thought": last.thought, "notice": self.notice, **ours}

    def chunk(self, delta: dict, finish_reason=None, **extra) -> bytes:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}], **extra}
        return sse(body)


def usage(last) -> dict:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens}


def sse(body) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"


def _boxes(last) -> list[dict] | None:
    """The answer's box_2d entries on the request's one picture, each with its [W, H], as the
    backend's last Response carries them (mapped where the picture was decoded); None without."""
    return [box.as_dict() for box in last.boxes] or None


def _as_call(tools, text: str, finish_reason: str):
    """(tool_calls entry or None, OpenAI's finish_reason) for a finished answer."""
    call = tools.read_call(text) if tools is not None and finish_reason == "stop" else None
    return call, ("tool_calls" if call is not None else OPENAI_FINISH.get(finish_reason, finish_reason))


async def _joined(job, item, meta: _Meta, tools=None, schema=None) -> dict:
    pieces, last = [], None
    while item is not DONE:
        if not isinstance(item, Progress):
            pieces.append(item.text)
            if item.finish_reason is not None:
                last = item
        item = await job.next()
    if last is None:
        raise ApiError(503, "the answer was cancelled before it finished")
    meta.record(last)
    content = "".join(pieces)
    if schema is not None and last.finish_reason in CUT:  # closed at its last complete entry
        content = close_cut_answer(content, schema, last.stats)
    call, finish_reason = _as_call(tools, content, last.finish_reason)
    message = {"role": "assistant", "content": content} if call is None else {
        "role": "assistant", "content": None, "tool_calls": [call]}
    boxes = _boxes(last) if call is None else None
    if boxes:
        message["boxes"] = boxes
    extras = {**meta.extras(last), **await meta.finished(content if call is None else None)}
    return {"id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(last), "medgemma_edge": extras}


async def _events(job, item, meta: _Meta, include_usage: bool, tools=None):
    extra = {"usage": None} if include_usage else {}
    yield meta.chunk({"role": "assistant", "content": ""}, **extra)
    last, held = None, None if tools is None else ""  # held: text kept back while it may be a call
    sent = []
    try:
        while item is not DONE:
            if isinstance(item, Progress):
                yield meta.chunk({}, medgemma_edge={"progress": item.as_dict()}, **extra)
                item = await job.next()
                continue
            sent.append(item.text)
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
    meta.record(last)
    finish_reason, call = OPENAI_FINISH.get(last.finish_reason, last.finish_reason), None
    if held:
        call, finish_reason = _as_call(tools, held, finish_reason)
        delta = {"content": held} if call is None else {"tool_calls": [{"index": 0, **call}]}
        yield meta.chunk(delta, **extra)
    boxes = _boxes(last) if call is None else None
    extras = {**meta.extras(last), **await meta.finished("".join(sent) if call is None else None)}
    yield meta.chunk({"boxes": boxes} if boxes else {}, finish_reason, medgemma_edge=extras, **extra)
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

