"""`serve --upstream URL`: our image path in front of another OpenAI-compatible engine.

One box answers one question at a time. To serve more, run the model in engines that batch and
scale (llama.cpp's server, vLLM with the original checkpoint, Ollama's /v1) behind a load balancer,
and keep this server in front: the engines then only ever see finished pictures. Each image item
goes through the same path as in the local backend — DICOM read, CT windows, slice choice with
`SLICE i` labels (runtime.sources), fit and resize to 896² (runtime.preprocess.model_view) — and
reaches the engine as a lossless PNG data URL at the model's size, so the engine's own resize is
the identity and its letterbox never runs. The text goes as it is.

What differs is the engine's business: it renders the chat with its own template (llama.cpp's
mtmd writes Gemma 3's image block without the blank lines transformers puts around it, one token
fewer per image here), runs its own sampler, and counts its own tokens; `Stats` carries what the
upstream reports. The runtime's no-socket promise excludes this mode by design: the user named the
URL.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image

from medgemma_edge.runtime import chat as chatfmt
from medgemma_edge.runtime.errors import BusyError, InputError, MedGemmaEdgeError
from medgemma_edge.runtime.memory import peak_rss_mb
from medgemma_edge.runtime.picture import DEFAULT_MAX_SLICES, Picture
from medgemma_edge.runtime.preprocess import DEFAULT_FIT, FITS, IMAGE_SIZE, model_view
from medgemma_edge.runtime.reply import Response, Stats
from medgemma_edge.runtime.sources import load_pictures

SILENCE_S = 600.0  # longest wait for the upstream's next byte: a CT series' prefill on a CPU takes minutes
CONNECT_S = 10.0
# Lossless at every level; 1 encodes an 896² CT view in ~50 ms (641 kB) where the default 6 takes
# ~175 ms (477 kB): on a LAN the bytes are cheaper than the time.
PNG_LEVEL = 1
CACHE_MB = 256  # encoded images kept by source digest (an 85-slice CT is ~55 MB of PNG)
CANCEL_POLL_S = 0.2
ERROR_CHARS = 300  # an upstream message is cut to one line of at most this


class UpstreamError(MedGemmaEdgeError):
    """The upstream engine is unreachable, failed, or refused our configuration (key, URL, model
    name): not the client's fault, a bad gateway (HTTP 502)."""


class UpstreamBackend:
    """A `Backend` (server/backend.py) whose model is an OpenAI-compatible engine at `url`
    (`http://host:port/v1`). `model`: the name the engine serves (default: the first of its
    /models, asked in the background at once). `bundle`: optional; a bundle folder whose manifest gives the image size. `extra_body`:
    fields added to every request, for an engine's own knobs (e.g. `{"repeat_penalty": 1.0}` for
    llama-cpp-python, whose default of 1.1 bends greedy answers)."""

    notice = None

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None,
                 image_size: int | None = None, fit: str = DEFAULT_FIT, threads: int | None = None, *,
                 bundle=None, extra_body: dict | None = None, timeout_s: float = SILENCE_S,
                 cache_mb: float = CACHE_MB):
        if fit not in FITS:
            raise InputError(f"unknown fit {fit!r:.40} — use one of {', '.join(FITS)}")
        self.base_url = upstream_base(url)
        if image_size is None:
            image_size = IMAGE_SIZE if bundle is None else _manifest_image_size(bundle)
        self.model, self.image_size, self.fit, self.threads = model, image_size, fit, threads
        self.extra_body = dict(extra_body or {})
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers,
                                   timeout=httpx.Timeout(timeout_s, connect=CONNECT_S))
        self._served: str | None = None  # the model name found at /models
        self._encoded = _EncodedCache(int(cache_mb * 2**20))
        if model is None:  # learn the name in the background, so /v1/models soon lists the engine's
            threading.Thread(target=self._find_model, name="medgemma-edge-upstream", daemon=True).start()

    @property
    def model_id(self) -> str:
        return self.model or self._served or "upstream"

    # -- the Backend protocol -------------------------------------------------------------------
    def prepare(self, messages: list[dict], options: dict) -> None:
        """Decode, window, resize and PNG-encode every image now (no request to the upstream);
        chat then finds them cached."""
        self.upstream_messages(messages, options)

    def chat(self, messages: list[dict], options: dict, cancelled: Callable[[], bool]) -> Iterator[Response]:
        t0 = time.perf_counter()
        stats = Stats()
        body = self.request_body(messages, options, stats)
        stats.preprocess_ms = round((time.perf_counter() - t0) * 1000, 2)
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        yield from self._stream(body, stats, cancelled, t0)

    # -- request --------------------------------------------------------------------------------
    def request_body(self, messages: list[dict], options: dict, stats: Stats | None = None) -> dict:
        """The OpenAI chat request the upstream gets for `messages` and `options`."""
        converted = self.upstream_messages(messages, options, stats)  # a bad image fails before any request
        return {"model": self.served_model(), "messages": converted, **_sampling(options), **self.extra_body}

    def upstream_messages(self, messages: list[dict], options: dict, stats: Stats | None = None) -> list[dict]:
        """`messages` in OpenAI's shape: images as PNG data URLs of our views, each followed by its
        label; `think` as MedGemma's system-prompt switch. (model_view checks fit, the DICOM reader
        window and max_slices, each with its own one-line InputError.)"""
        image = {"fit": options.get("fit") or self.fit, "window": options.get("window"),
                 "max_slices": options.get("max_slices", DEFAULT_MAX_SLICES)}
        out, system = [], None
        for msg in chatfmt.check_messages(messages):
            if msg["role"] == "system":
                system = _text_only(msg.get("content"), "a system message")
                continue
            role = "assistant" if msg["role"] in ("assistant", "model") else "user"
            if role == "assistant":
                out.append({"role": role, "content": _text_only(msg.get("content"), "an assistant message")})
            else:
                out.append({"role": role, "content": self._user_content(msg.get("content"), image, stats)})
        if options.get("think"):
            system = chatfmt.THINK_PREFIX + (system or "")
        if system is not None:
            out.insert(0, {"role": "system", "content": system})
        return out

    def served_model(self) -> str:
        """`model` as given, else the first model the upstream lists (asked once)."""
        if self.model or self._served:
            return self.model or self._served
        try:
            response = self.client.get("/models", timeout=CONNECT_S * 3)
        except httpx.HTTPError as err:
            raise _unreachable(self.base_url, err) from None
        _raise_for_status(response, self.base_url)
        try:
            self._served = str(response.json()["data"][0]["id"])
        except (ValueError, KeyError, IndexError, TypeError):
            raise UpstreamError(f"the upstream at {self.base_url} lists no model at /models — "
                                "name the model it serves") from None
        return self._served

    def _find_model(self) -> None:
        try:
            self.served_model()
        except MedGemmaEdgeError:
            pass  # the engine may start later; the first chat asks again, and says why if it fails

    def _user_content(self, content, image: dict, stats: Stats | None) -> str | list[dict]:
        if isinstance(content, str):
            return content
        parts = []
        for item in _items(content):
            kind = item.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": item.get("text", "")})
            elif kind == "image":
                src = item.get("image", item.get("path", item.get("url")))
                if src is None:
                    raise InputError("an image item has no 'image' value — give bytes, a path or pictures")
                for url, label in self.encode_images(src, **image):
                    parts.append({"type": "image_url", "image_url": {"url": url}})
                    if label:
                        parts.append({"type": "text", "text": label})
                    if stats is not None:
                        stats.images += 1
            else:
                raise InputError(f"unknown content type {kind!r:.40} — use text or image")
        return parts

    def encode_images(self, src, *, fit: str, window, max_slices: int) -> list[tuple[str, str | None]]:
        """One image source → [(PNG data URL of its model view, label)], from the cache when the
        same bytes came with the same options before."""
        key = _source_key(src, (self.image_size, fit, window, max_slices))
        found = self._encoded.get(key) if key else None
        if found is not None:
            return found
        pictures = _pictures(src, window, max_slices, self.threads)
        views = model_view(pictures, self.image_size, fit, threads=self.threads)  # (N, S, S, 3)
        encoded = [(png_data_url(view), pic.label) for view, pic in zip(views, pictures)]
        if key:
            self._encoded.put(key, encoded)
        return encoded

    # -- answer ---------------------------------------------------------------------------------
    def _stream(self, body: dict, stats: Stats, cancelled, t0: float) -> Iterator[Response]:
        thoughts, n_new, t_first, finish, usage = chatfmt.ThoughtFilter(), 0, None, None, {}
        try:
            with self.client.stream("POST", "/chat/completions", json=body) as response:
                _raise_for_status(response, self.base_url)
                watch = _CancelWatch(cancelled, response)
                try:
                    for chunk in _sse_chunks(response):
                        if cancelled():
                            return
                        if isinstance(chunk.get("error"), (dict, str)):
                            raise UpstreamError(f"the upstream failed mid-answer: {_one_line(_message_of(chunk))}")
                        usage = chunk.get("usage") or usage
                        choice = (chunk.get("choices") or [{}])[0]
                        piece = (choice.get("delta") or {}).get("content") or ""
                        finish = choice.get("finish_reason") or finish
                        if piece:
                            n_new += 1  # one token per chunk in llama.cpp, vLLM and Ollama; usage corrects it
                            t_first = t_first or time.perf_counter()
                            yield Response(thoughts.push(piece), None, 0, n_new)
                finally:
                    watch.stop()
        except httpx.HTTPError as err:
            if cancelled():
                return  # our own abort of the stream
            raise _unreachable(self.base_url, err) from None
        if cancelled():
            return
        if finish is None:
            raise UpstreamError(f"the upstream at {self.base_url} ended the answer without finishing it "
                                "— see the engine's log")
        t_end = time.perf_counter()
        thought, rest = thoughts.finish()
        stats.prompt_tokens = int(usage.get("prompt_tokens") or 0)  # 0: the upstream's stream carried no usage
        completion = int(usage.get("completion_tokens") or n_new)
        if t_first is not None:
            stats.ttft_s = round(t_first - t0, 4)
            if n_new > 1:
                stats.decode_tok_s = round((n_new - 1) / (t_end - t_first), 2)
        stats.peak_rss_mb = peak_rss_mb()
        reason = "length" if finish == "length" else "stop"
        yield Response(rest, None, stats.prompt_tokens, completion, reason, thought, stats)


def upstream_base(url) -> str:
    """`http://host:port/v1` from what a user may type: with or without /v1, a trailing slash, or
    the full /chat/completions address."""
    if not isinstance(url, str) or not url.strip():
        raise InputError("--upstream needs a URL such as http://127.0.0.1:8000/v1")
    url = url.strip().rstrip("/")
    for tail in ("/chat/completions", "/completions"):
        if url.endswith(tail):
            url = url[: -len(tail)]
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InputError(f"--upstream {url!r:.80} is not an http(s) URL — e.g. http://127.0.0.1:8000/v1")
    return url if parts.path not in ("", "/") else url + "/v1"


def png_data_url(view: np.ndarray) -> str:
    """A uint8 (S, S, 3) view as a lossless PNG data URL. A gray view (R = G = B, every X-ray and
    MR) goes as one channel: a third of the bytes, and every decoder expands it back to the same
    RGB."""
    gray = bool(np.array_equal(view[:, :, 0], view[:, :, 1]) and np.array_equal(view[:, :, 0], view[:, :, 2]))
    image = Image.fromarray(np.ascontiguousarray(view[:, :, 0]) if gray else view)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=PNG_LEVEL)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# -- options and messages -------------------------------------------------------------------------
def _sampling(options: dict) -> dict:
    """Our options as OpenAI fields. top_k goes only when set: OpenAI itself refuses it, while
    llama.cpp, vLLM and Ollama take it."""
    body = {"max_tokens": options.get("max_tokens", 256), "temperature": options.get("temperature", 0.0),
            "top_p": options.get("top_p", 1.0)}
    for name in ("seed", "stop", "top_k"):
        if options.get(name):
            body[name] = options[name]
    if options.get("json_schema") is not None:  # vLLM, llama.cpp and Ollama take OpenAI's form
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer",
                                                                          "schema": options["json_schema"]}}
    if options.get("grammar") is not None:  # llama.cpp's server field (tool_choice "auto", server/tools.py)
        body["grammar"] = options["grammar"]
    return body


def _items(content) -> list[dict]:
    return [content] if isinstance(content, dict) else list(content)  # chatfmt.check_messages checked it


def _text_only(content, what: str) -> str:
    if isinstance(content, str):
        return content
    items = _items(content)
    if any(i.get("type") != "text" for i in items):
        raise InputError(f"{what} can hold text only — put images in a user message")
    return " ".join(str(i.get("text", "")) for i in items)


def _manifest_image_size(bundle) -> int:
    from medgemma_edge.runtime.manifest import read_manifest

    return int((read_manifest(Path(bundle)).get("image") or {}).get("size", IMAGE_SIZE))


def _pictures(src, window, max_slices: int, threads) -> list[Picture]:
    if isinstance(src, (list, tuple)) and src and all(isinstance(p, Picture) for p in src):
        return list(src)  # decoded already (an upload of /v1/images)
    if isinstance(src, Picture):
        return [src]
    return load_pictures(src, window=window, max_slices=max_slices, threads=threads)


def _source_key(src, options: tuple) -> str | None:
    """A digest of the source's bytes and the image options, or None for sources not worth
    hashing (paths can change under the same name; arrays and PIL images come from code)."""
    h = hashlib.sha256(repr(options).encode())
    items = src if isinstance(src, (list, tuple)) else [src]
    for item in items:
        if isinstance(item, (bytes, bytearray, memoryview)):
            data = bytes(item)
        elif isinstance(item, Picture):
            data = repr((item.pixels.shape, item.label)).encode() + np.ascontiguousarray(item.pixels).tobytes()
        else:
            return None
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


class _EncodedCache:
    """Least recently used [(data URL, label)] lists, bounded by their total size."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes, self._entries = max_bytes, 0, OrderedDict()
        self._lock = threading.Lock()  # the server may prepare on one thread and chat on another

    def get(self, key: str):
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
            return self._entries.get(key)

    def put(self, key: str, value: list) -> None:
        size = lambda entry: sum(len(url) for url, _ in entry)
        with self._lock:
            if key not in self._entries and size(value) <= self.max_bytes:
                self._entries[key], self.bytes = value, self.bytes + size(value)
            while self.bytes > self.max_bytes:
                self.bytes -= size(self._entries.popitem(last=False)[1])


# -- the wire --------------------------------------------------------------------------------------
def _sse_chunks(response: httpx.Response) -> Iterator[dict]:
    """The JSON objects of an OpenAI server-sent-event stream, up to `data: [DONE]`."""
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, `: ping` comments, `event:` lines
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            raise UpstreamError("the upstream sent a stream event that is not JSON — is --upstream "
                                "an OpenAI-compatible /v1 address?") from None
        if isinstance(chunk, dict):
            yield chunk


class _CancelWatch:
    """Ends the upstream stream as soon as `cancelled()` turns true, also while the engine is still
    silent (prefilling a CT series sends nothing for minutes). Closing the socket from another
    thread does not wake a blocked read on Linux; shutting it down does, and tells the engine."""

    def __init__(self, cancelled: Callable[[], bool], response: httpx.Response):
        self._done = threading.Event()
        stream = response.extensions.get("network_stream")
        self._sock = stream.get_extra_info("socket") if stream is not None else None
        self._thread = threading.Thread(target=self._watch, args=(cancelled,), daemon=True)
        self._thread.start()

    def _watch(self, cancelled) -> None:
        while not self._done.wait(CANCEL_POLL_S):
            if cancelled():
                if self._sock is not None:
                    try:
                        self._sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass  # already closed: the stream has ended anyway
                return

    def stop(self) -> None:
        self._done.set()


def _raise_for_status(response: httpx.Response, base_url: str) -> None:
    """The upstream's refusal as our error: the request's fault (400, 413, 422) → InputError with its
    message; busy (429, 503) → BusyError; our key, URL or model name, or its failure → UpstreamError."""
    if response.status_code < 400:
        return
    try:
        response.read()
        message = _message_of(response.json())
    except ValueError:
        message = response.text
    except httpx.HTTPError:
        message = ""
    message = _one_line(message) or response.reason_phrase
    status = response.status_code
    if status in (400, 413, 422):
        raise InputError(f"the upstream engine refused the request ({status}): {message}")
    if status in (429, 503):
        raise BusyError(f"the upstream engine is busy ({status}): {message} — ask again later")
    if status in (401, 403):
        raise UpstreamError(f"the upstream at {base_url} refused our key ({status}) — check the upstream's API key")
    if status == 404:
        raise UpstreamError(f"the upstream at {base_url} answered 404 ({message}) — check the URL "
                            "(it ends in /v1) and the model name")
    raise UpstreamError(f"the upstream engine at {base_url} failed ({status}): {message}")


def _message_of(payload) -> str:
    """The message of the error shapes engines send: OpenAI/vLLM/llama.cpp {"error": {"message"}},
    Ollama {"error": "..."}, FastAPI {"detail": ...}."""
    if isinstance(payload, dict):
        error = payload.get("error", payload.get("detail"))
        if isinstance(error, dict):
            return str(error.get("message") or error)
        if error is not None:
            return str(error)
    return str(payload)


def _one_line(text) -> str:
    line = (str(text or "").strip().splitlines() or [""])[0]
    return line[:ERROR_CHARS] + ("…" if len(line) > ERROR_CHARS else "")


def _unreachable(base_url: str, err: httpx.HTTPError) -> UpstreamError:
    if isinstance(err, httpx.TimeoutException):
        what = "sent nothing in time" if isinstance(err, httpx.ReadTimeout) else "did not answer the connection"
        return UpstreamError(f"the upstream engine at {base_url} {what} ({type(err).__name__}) — "
                             "check that it runs and is not overloaded")
    if isinstance(err, (httpx.ConnectError, httpx.ConnectTimeout)):
        return UpstreamError(f"cannot reach the upstream engine at {base_url} — start it, or check --upstream")
    return UpstreamError(f"the connection to the upstream engine at {base_url} broke "
                         f"({type(err).__name__}) — see the engine's log")
