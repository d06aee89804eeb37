"""`serve --upstream URL`: our image path in front of another OpenAI-compatible engine.

One box answers one question at a time. To serve more, run the model in engines that batch and
scale (llama.cpp's server, vLLM with the original checkpoint, Ollama's /v1) behind a load balancer,
and keep this server in front: the engines then only ever see finished pictures. Each image item
goes through the same path as in the local backend — DICOM read, CT windows, slice choice with
`SLICE i` labels (runtime.sources), fit and resize to 896² (runtime.preprocess.model_view) — and
reaches the engine as a lossless PNG data URL at the model's size, so the engine's own resize is
the identity and its letterbox never runs. The text goes as it is; so does a tool's history, in
the form the local model reads it (server/upstream_request.py says why).

Which engine it is decides how structured answers are asked for (server/upstream_request.py has
the table): `--upstream-kind auto|llama.cpp|vllm|ollama|openai`. auto asks the engine's /v1/models
once and reads `owned_by`: "llamacpp" (llama-server) or "me" (llama-cpp-python's server) →
llama.cpp, "vllm" → vllm, "library" (or port 11434) → ollama, anything else → openai, which
gets OpenAI's own fields only. A feature the engine cannot honour is refused in one line (400)
rather than sent in a field the engine would drop.

What differs is the engine's business: it renders the chat with its own template (llama.cpp's
mtmd writes Gemma 3's image block without the blank lines transformers puts around it, one token
fewer per image here; Ollama's /v1 turns each part of a message into a message of its own), runs
its own sampler, and counts its own tokens; `Stats` carries what the upstream reports. The
runtime's no-socket promise excludes this mode by design: the user named the URL. The wire is
the `openai` SDK's (server/upstream_client.py, with the error mapping).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

from cachetools import LRUCache

from medgemma_edge.runtime import chat as chatfmt
from medgemma_edge.runtime.boxes import answer_boxes
from medgemma_edge.runtime.errors import InputError, MedGemmaEdgeError
from medgemma_edge.runtime.memory import peak_rss_mb
from medgemma_edge.runtime.picture import DEFAULT_MAX_SLICES
from medgemma_edge.runtime.preprocess import DEFAULT_FIT, FITS, IMAGE_SIZE, model_view
from medgemma_edge.runtime.reply import Response, Stats
from medgemma_edge.runtime.sources import load_pictures
from medgemma_edge.server.errors import UpstreamError
from medgemma_edge.server.upstream_client import EngineClient
from medgemma_edge.server.upstream_request import (check_kind, detect_kind, engine_fields, openai_messages,
                                                   png_data_url, source_key, upstream_base)

SILENCE_S = 600.0  # longest wait for the upstream's next byte: a CT series' prefill on a CPU takes minutes
CONNECT_S = 10.0
CACHE_MB = 256  # encoded images kept by source digest (an 85-slice CT series is tens of MB of PNG)


class UpstreamBackend:
    """A `Backend` (server/backend.py) whose model is an OpenAI-compatible engine at `url`
    (`http://host:port/v1`). `model`: the name the engine serves (default: the first of its
    /models, asked in the background at once). `kind`: the engine's (module docstring).
    `bundle`: optional; a bundle folder whose manifest gives the image size. `extra_body`:
    fields added to every request, for an engine's own knobs (e.g. `{"repeat_penalty": 1.0}` for
    llama-cpp-python, whose default of 1.1 bends greedy answers)."""

    notice = None

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None,
                 image_size: int | None = None, fit: str = DEFAULT_FIT, threads: int | None = None, *,
                 kind: str = "auto", bundle=None, extra_body: dict | None = None, timeout_s: float = SILENCE_S,
                 cache_mb: float = CACHE_MB):
        if fit not in FITS:
            raise InputError(f"unknown fit {fit!r:.40} — use one of {', '.join(FITS)}")
        self.base_url, self.kind = upstream_base(url), check_kind(kind)
        if image_size is None:
            image_size = IMAGE_SIZE if bundle is None else _manifest_image_size(bundle)
        self.model, self.image_size, self.fit, self.threads = model, image_size, fit, threads
        self.extra_body = dict(extra_body or {})
        self.client = EngineClient(self.base_url, api_key, silence_s=timeout_s, connect_s=CONNECT_S)
        self._listed: dict | None = None  # the first model at /models: {"id", "owned_by"}
        # [(data URL, label)] per source digest, bounded by the URLs' bytes; the lock, because the
        # server prepares on one thread while it answers on another (LRUCache is not thread-safe).
        self._encoded = LRUCache(max(1, int(cache_mb * 2**20)), getsizeof=_url_bytes)
        self._lock = threading.Lock()
        if model is None or self.kind == "auto":  # soon known, so /v1/models lists the engine's name
            threading.Thread(target=self._find_model, name="medgemma-edge-upstream-models", daemon=True).start()

    @property
    def model_id(self) -> str:
        return self.model or (self._listed or {}).get("id") or "upstream"

    # -- the Backend protocol -------------------------------------------------------------------
    def prepare(self, messages: list[dict], options: dict) -> None:
        """Decode, window, resize and PNG-encode every image now (no request to the upstream);
        chat then finds them cached."""
        self.upstream_messages(messages, options)

    def chat(self, messages: list[dict], options: dict, cancelled: Callable[[], bool]) -> Iterator[Response]:
        t0 = time.perf_counter()
        stats, sizes = Stats(), []
        body = self.request_body(messages, options, stats, sizes)
        stats.preprocess_ms = round((time.perf_counter() - t0) * 1000, 2)
        fit = options.get("fit") or self.fit
        locate = lambda text: answer_boxes(text, sizes, fit)  # noqa: E731 (box_2d on the picture as sent)
        yield from self._answer(self.client.stream(body, cancelled), stats, cancelled, t0, locate)

    def close(self) -> None:
        self.client.close()

    # -- request --------------------------------------------------------------------------------
    def request_body(self, messages: list[dict], options: dict, stats: Stats | None = None,
                     sizes: list | None = None) -> dict:
        """The OpenAI chat request (JSON, without `stream`) the upstream gets for `messages` and
        `options`; InputError for a feature the engine cannot honour, before anything is sent.
        `sizes` (optional) receives, per image item, the (H, W) of each picture it decoded to."""
        converted = self.upstream_messages(messages, options, sizes)  # a bad image fails before any request
        if stats is not None:
            stats.images = sum(part["type"] == "image_url" for msg in converted if isinstance(msg["content"], list)
                               for part in msg["content"])
        return {"model": self.served_model(), "messages": converted,
                **engine_fields(options, self.engine_kind()), **self.extra_body}

    def upstream_messages(self, messages: list[dict], options: dict, sizes: list | None = None) -> list[dict]:
        """`messages` in OpenAI's shape, every image as our views' PNG data URLs (model_view checks
        fit, the DICOM reader window and max_slices, each with its own one-line InputError)."""
        image = {"fit": options.get("fit") or self.fit, "window": options.get("window"),
                 "max_slices": options.get("max_slices", DEFAULT_MAX_SLICES)}

        def encode(src):
            encoded = self.encode_images(src, **image)
            if sizes is not None:
                sizes.append([size for _, _, size in encoded])
            return [(url, label) for url, label, _ in encoded]

        return openai_messages(messages, bool(options.get("think")), encode)

    def encode_images(self, src, *, fit: str, window, max_slices: int) -> list[tuple[str, str | None, tuple]]:
        """One image source → [(PNG data URL of its model view, label, (H, W) of the picture as
        decoded)], from the cache when the same bytes came with the same options before."""
        key = source_key(src, (self.image_size, fit, window, max_slices))
        if key is not None:
            with self._lock:
                found = self._encoded.get(key)
            if found is not None:
                return found
        pictures = load_pictures(src, window=window, max_slices=max_slices)
        views = model_view(pictures, self.image_size, fit, threads=self.threads)  # (N, S, S, 3)
        # A PDF page's text goes with its label, as runtime/chat.expand_images gives it to our own model.
        said = ["\n\n".join(t for t in (pic.label, pic.text) if t) or None for pic in pictures]
        encoded = [(png_data_url(view), text, pic.pixels.shape[:2]) for view, text, pic in zip(views, said, pictures)]
        if key is not None and _url_bytes(encoded) <= self._encoded.maxsize:  # larger: used once, not kept
            with self._lock:
                self._encoded[key] = encoded
        return encoded

    # -- the engine -----------------------------------------------------------------------------
    def served_model(self) -> str:
        """`model` as given, else the first model the upstream lists (asked once)."""
        return self.model or self._first_listed()["id"]

    def engine_kind(self) -> str:
        """The kind as given, or (auto) read from the engine's /models."""
        return self.kind if self.kind != "auto" else detect_kind(self.base_url, self._first_listed().get("owned_by"))

    def _first_listed(self) -> dict:
        if self._listed is None:
            models = self.client.models()
            if not models:
                raise UpstreamError(f"the upstream at {self.base_url} lists no model at /models — name the model "
                                    "it serves with --upstream-model")
            self._listed = models[0]
        return self._listed

    def _find_model(self) -> None:
        try:
            self._first_listed()
        except MedGemmaEdgeError:
            pass  # the engine may start later; the first chat asks again, and says why if it fails

    # -- answer ---------------------------------------------------------------------------------
    def _answer(self, chunks, stats: Stats, cancelled, t0: float, locate=None) -> Iterator[Response]:
        thoughts, n_new, t_first, finish, usage = chatfmt.ThoughtFilter(), 0, None, None, None
        shown = []
        for chunk in chunks:
            if cancelled():
                return
            usage = getattr(chunk, "usage", None) or usage
            choice = (getattr(chunk, "choices", None) or [None])[0]
            delta = getattr(choice, "delta", None)
            piece = getattr(delta, "content", None) or ""
            finish = getattr(choice, "finish_reason", None) or finish
            if piece:
                n_new += 1  # one token per chunk in llama.cpp, vLLM and Ollama; usage corrects it
                t_first = t_first or time.perf_counter()
                text = thoughts.push(piece)
                shown.append(text)
                yield Response(text, None, 0, n_new)
        if cancelled():
            return
        if finish is None:
            raise UpstreamError(f"the upstream at {self.base_url} ended the answer without finishing it "
                                "— see the engine's log")
        t_end = time.perf_counter()
        thought, rest = thoughts.finish()
        stats.prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)  # 0: the stream carried no usage
        completion = int(getattr(usage, "completion_tokens", 0) or n_new)
        if t_first is not None:
            stats.ttft_s = round(t_first - t0, 4)
            if n_new > 1:
                stats.decode_tok_s = round((n_new - 1) / (t_end - t_first), 2)
        stats.peak_rss_mb = peak_rss_mb()
        reason = "length" if finish == "length" else "stop"
        boxes = locate("".join(shown) + rest) if locate is not None else []
        yield Response(rest, None, stats.prompt_tokens, completion, reason, thought, stats, boxes)


def _url_bytes(encoded: list) -> int:
    return sum(len(url) for url, _, _ in encoded)


def _manifest_image_size(bundle) -> int:
    from medgemma_edge.runtime.gguf_import import open_model_files

    return int((open_model_files(bundle, hashes=False)[1].get("image") or {}).get("size", IMAGE_SIZE))
