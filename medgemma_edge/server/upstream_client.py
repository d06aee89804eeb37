"""The upstream engine's client: the `openai` SDK's async client, on an event loop of its own.

Backends are called on the model worker's thread and yield their answer piece by piece
(server/backend.py); the SDK's client runs on a private loop thread and its chunks cross to the
worker through a queue. Async, because cancelling the request's task wakes a read that waits on a
silent engine (prefilling a CT series sends nothing for minutes) at once and closes the
connection, which tells the engine to stop.

The SDK wants a key: without one, each request leaves the Authorization header out rather than
send a made-up key (and the key always comes from us, never from the OPENAI_API_KEY of the
environment). It never retries: a failed request is answered at once, and the client may ask again.

Errors become ours, one line each, with the engine's message cut to one line:
- unreachable, timed out, or the connection broken → UpstreamError (502);
- 400, 413, 422: the engine refused what was asked (a prompt longer than its context, a schema it
  cannot compile) → InputError (400), with the engine's reason: the client's to fix;
- 429, 503: busy → BusyError (429 with Retry-After);
- 401/403 (our key), 404 (the URL or the model name), any other status, an error event mid-answer,
  or a reply that is not OpenAI's → UpstreamError (502): the configuration's or the engine's fault.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Iterator

from medgemma_edge.runtime.errors import BusyError, InputError, MedGemmaEdgeError
from medgemma_edge.server.errors import UpstreamError

CANCEL_POLL_S = 0.2  # how often a waiting answer looks at cancelled()
MODELS_S = 30.0  # the wait for /models: the engine lists its models without computing anything
ERROR_CHARS = 300  # an upstream message is cut to one line of at most this
_END = object()


class EngineClient:
    """The engine at `base_url` (`http://host:port/v1`). `silence_s`: the longest wait for the
    engine's next byte; `connect_s`: for the connection."""

    def __init__(self, base_url: str, api_key: str | None, *, silence_s: float, connect_s: float):
        import openai  # the serve extra; imported here so that the server's other modules do not need it

        self.base_url = base_url
        self._headers = {} if api_key else {"Authorization": openai.Omit()}
        self._sdk = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "none", max_retries=0,
                                       timeout=openai.Timeout(silence_s, connect=connect_s))
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="medgemma-edge-upstream", daemon=True).start()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._sdk.close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)

    def models(self) -> list[dict]:
        """The engine's /models as [{"id", "owned_by"}]."""
        future = asyncio.run_coroutine_threadsafe(self._models(), self._loop)
        try:
            return future.result()
        except Exception as err:
            raise our_error(err, self.base_url, mid_answer=False) from None

    def stream(self, body: dict, cancelled: Callable[[], bool]) -> Iterator:
        """The chunks (openai ChatCompletionChunk) of `body` streamed, with usage at the end. Ends
        quietly, and ends the engine's request, as soon as `cancelled()` turns true."""
        items: queue.SimpleQueue = queue.SimpleQueue()
        future = asyncio.run_coroutine_threadsafe(self._pump(body, items.put), self._loop)
        try:
            while True:
                try:
                    item = items.get(timeout=CANCEL_POLL_S)
                except queue.Empty:
                    if cancelled():
                        return
                    continue
                if item is _END:
                    return
                if isinstance(item, tuple):  # (error, whether the answer had begun)
                    if cancelled():
                        return
                    raise our_error(item[0], self.base_url, mid_answer=item[1]) from None
                yield item
        finally:
            future.cancel()  # no-op once finished; else the task closes the connection

    async def _models(self) -> list[dict]:
        page = await self._sdk.models.list(extra_headers=self._headers, timeout=MODELS_S)
        return [{"id": str(m.id), "owned_by": getattr(m, "owned_by", None)} for m in page.data]

    async def _pump(self, body: dict, put) -> None:
        begun = False
        try:
            rest = {k: v for k, v in body.items() if k not in ("model", "messages")}
            stream = await self._sdk.chat.completions.create(
                model=body["model"], messages=body["messages"], stream=True, extra_headers=self._headers,
                extra_body={**rest, "stream_options": {"include_usage": True}})
            begun = True
            async for chunk in stream:
                put(chunk)
            put(_END)
        except Exception as err:  # CancelledError is no Exception: a cancelled task just ends
            put((err, begun))


def our_error(err: Exception, base_url: str, *, mid_answer: bool) -> MedGemmaEdgeError:
    """The SDK's exception as the one-line error the client gets (see the module's list)."""
    import openai

    if isinstance(err, MedGemmaEdgeError):
        return err
    if isinstance(err, openai.APITimeoutError):
        return UpstreamError(f"the upstream engine at {base_url} sent nothing in time — check that it runs and "
                             "is not overloaded")
    if isinstance(err, openai.APIConnectionError):
        if mid_answer:
            return UpstreamError(f"the connection to the upstream engine at {base_url} broke mid-answer — "
                                 "see the engine's log")
        return UpstreamError(f"cannot reach the upstream engine at {base_url} — start it, or check --upstream")
    if isinstance(err, openai.APIStatusError):
        status, message = err.status_code, one_line(message_of(err.body)) or f"HTTP {err.status_code}"
        if status in (400, 413, 422):
            return InputError(f"the upstream engine refused the request ({status}): {message}")
        if status in (429, 503):
            return BusyError(f"the upstream engine is busy ({status}): {message} — ask again later")
        if status in (401, 403):
            return UpstreamError(f"the upstream at {base_url} refused our key ({status}) — check "
                                 "--upstream-key-file")
        if status == 404:
            return UpstreamError(f"the upstream at {base_url} answered 404 ({message}) — check the URL (it "
                                 "ends in /v1) and --upstream-model")
        return UpstreamError(f"the upstream engine at {base_url} failed ({status}): {message}")
    if isinstance(err, openai.APIError):  # an error event in the stream
        return UpstreamError(f"the upstream engine failed mid-answer: {one_line(message_of(err.body) or err.message)}")
    if isinstance(err, ValueError):  # a stream event that is not JSON
        return UpstreamError(f"the upstream at {base_url} answered in a form that is not OpenAI's — is --upstream "
                             "an OpenAI-compatible /v1 address?")
    raise err


def message_of(body) -> str:
    """The message in the error bodies engines send (the SDK has taken the `error` member out):
    OpenAI/vLLM/llama.cpp {"message"}, Ollama "...", FastAPI {"detail": [{"loc", "msg"}]} — of
    which only where and what, never the `input` it quotes (the request's own data)."""
    if isinstance(body, dict):
        detail = body.get("detail")
        if isinstance(detail, list):
            return "; ".join(".".join(str(p) for p in d.get("loc", ())) + ": " + str(d.get("msg", ""))
                             for d in detail if isinstance(d, dict))
        inner = body.get("message", detail if detail is not None else body.get("error"))
        if isinstance(inner, dict):
            return str(inner.get("message") or "")
        return "" if inner is None else str(inner)
    return "" if body is None else str(body)


def one_line(text) -> str:
    line = (str(text or "").strip().splitlines() or [""])[0]
    return line[:ERROR_CHARS] + ("…" if len(line) > ERROR_CHARS else "")
