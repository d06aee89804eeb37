"""What `serve --upstream` sends: the runtime's chat and options as the request an engine takes.

No network here (server/upstream_client.py sends it). The engine's kind decides the fields:

| feature                  | llama.cpp                         | vllm, ollama, openai                |
|--------------------------|-----------------------------------|-------------------------------------|
| json_schema              | response_format json_object+schema | response_format json_schema         |
| grammar (tool_choice auto) | `grammar` (GBNF)                | refused (400)                       |
| top_k                    | sent                              | vllm: sent; ollama, openai: refused |

- llama.cpp: both of its OpenAI servers, llama-server and llama-cpp-python's
  (`python -m llama_cpp.server`). llama-server reads response_format json_schema and json_object
  with a `schema`; llama-cpp-python's (0.3.x) types response_format as text | json_object and
  refuses json_schema (a validation error, answered as a 500) — the one form both take is
  json_object with a `schema`.
- vllm: OpenAI's json_schema form (its structured outputs). It can also take a grammar, but in its
  own field and dialect, which changed between versions: refused rather than sent untested.
- ollama: its /v1 endpoint (Ollama ≥ 0.5) turns response_format json_schema into its native
  `format`; it has no top_k there (the field would be dropped without a word), and no grammar.
- openai: any other OpenAI-compatible engine: OpenAI's own fields only.

Tools stay this server's protocol (server/tools.py), as for the local model: MedGemma has no tool
tokens, and Gemma 3's chat template renders no `tool` role and no assistant `tool_calls` (the
checkpoint's template raises on them; Ollama's gemma3 template drops them without a word), so a
tool's result reaches the engine as the user turn the local model sees — the same prompt, whoever
answers. What each engine gets for the call itself is the table's json_schema or grammar.
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Callable
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from medgemma_edge.runtime import chat as chatfmt
from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.generate import DEFAULT_MAX_NEW_TOKENS
from medgemma_edge.runtime.picture import Picture

KINDS = ("auto", "llama.cpp", "vllm", "ollama", "openai")
# /v1/models `owned_by` → kind: llama-server says "llamacpp", llama-cpp-python's server "me", vLLM
# "vllm"; Ollama names the model's namespace, "library" for its own models.
OWNERS = {"llamacpp": "llama.cpp", "me": "llama.cpp", "vllm": "vllm", "library": "ollama"}
OLLAMA_PORT = 11434  # Ollama's default port: its models from other namespaces have other owners
TOP_K_KINDS = ("llama.cpp", "vllm")
# Lossless at every level; the fastest level, because on a LAN the bytes cost less than the time.
PNG_LEVEL = 1


def detect_kind(base_url: str, owned_by) -> str:
    """`--upstream-kind auto`: the kind from /v1/models `owned_by`, else Ollama's port, else openai."""
    kind = OWNERS.get(str(owned_by or "").strip().lower())
    if kind is not None:
        return kind
    return "ollama" if urlsplit(base_url).port == OLLAMA_PORT else "openai"


def check_kind(kind) -> str:
    if kind not in KINDS:
        raise InputError(f"--upstream-kind {kind!r:.40} is not a kind — use one of {', '.join(KINDS)}")
    return kind


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


def engine_fields(options: dict, kind: str) -> dict:
    """The request fields for Backend.chat `options` on an engine of `kind` (not auto); InputError
    for what that engine cannot honour, before anything is sent."""
    body = {"max_tokens": options.get("max_tokens", DEFAULT_MAX_NEW_TOKENS),
            "temperature": options.get("temperature", 0.0), "top_p": options.get("top_p", 1.0)}
    if options.get("seed") is not None:
        body["seed"] = options["seed"]
    if options.get("stop"):
        body["stop"] = list(options["stop"])
    if options.get("top_k"):  # 0 is "off" for every engine: nothing to send
        if kind not in TOP_K_KINDS:
            raise InputError(f"top_k: the upstream engine ({kind}) does not take top_k over its OpenAI API — "
                             "leave it out, or set --upstream-kind if the engine is llama.cpp or vLLM")
        body["top_k"] = options["top_k"]
    schema = options.get("json_schema")
    if schema is not None:
        body["response_format"] = ({"type": "json_object", "schema": schema} if kind == "llama.cpp" else
                                   {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    if options.get("grammar") is not None:  # only tool_choice "auto" makes one (server/tools.py)
        if kind != "llama.cpp":
            raise InputError(f'tool_choice "auto" holds the answer to a call or plain text with a grammar, which '
                             f'the upstream engine ({kind}) does not take — send tool_choice "required" or name '
                             "the tool")
        body["grammar"] = options["grammar"]
    return body


def openai_messages(messages: list[dict], think: bool,
                    encode: Callable[[object], list[tuple[str, str | None]]]) -> list[dict]:
    """`messages` in OpenAI's shape. `encode(source)` gives each image source's [(data URL,
    label)]: every picture goes as its URL followed by its label. `think` is MedGemma's
    system-prompt switch, as in the local prompt (runtime/chat.py)."""
    out, system = [], None
    for msg in chatfmt.check_messages(messages):
        if msg["role"] == "system":
            system = _text_only(msg.get("content"), "a system message")
        elif msg["role"] in ("assistant", "model"):
            out.append({"role": "assistant", "content": _text_only(msg.get("content"), "an assistant message")})
        elif isinstance(msg.get("content"), str):
            out.append({"role": "user", "content": msg["content"]})
        else:
            parts = []
            for item in _items(msg.get("content")):
                kind = item.get("type")
                if kind == "text":
                    parts.append({"type": "text", "text": item.get("text", "")})
                elif kind == "image":
                    src = item.get("image", item.get("path", item.get("url")))
                    if src is None:
                        raise InputError("an image item has no 'image' value — give bytes, a path or pictures")
                    for url, label in encode(src):
                        parts.append({"type": "image_url", "image_url": {"url": url}})
                        parts += [{"type": "text", "text": label}] if label else []
                else:
                    raise InputError(f"unknown content type {kind!r:.40} — use text or image")
            out.append({"role": "user", "content": parts})
    if think:
        system = chatfmt.THINK_PREFIX + (system or "")
    if system is not None:
        out.insert(0, {"role": "system", "content": system})
    return out


def png_data_url(view: np.ndarray) -> str:
    """A uint8 (S, S, 3) view as a lossless PNG data URL. A gray view (R = G = B, every X-ray and
    MR) goes as one channel: a third of the bytes, and every decoder expands it back to the same
    RGB."""
    gray = bool(np.array_equal(view[:, :, 0], view[:, :, 1]) and np.array_equal(view[:, :, 0], view[:, :, 2]))
    image = Image.fromarray(np.ascontiguousarray(view[:, :, 0]) if gray else view)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=PNG_LEVEL)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def source_key(src, options: tuple) -> str | None:
    """A digest of the source's bytes and the image options, or None for sources not worth
    hashing (paths can change under the same name; arrays and PIL images come from code)."""
    h = hashlib.sha256(repr(options).encode())
    for item in src if isinstance(src, (list, tuple)) else [src]:
        if isinstance(item, (bytes, bytearray, memoryview)):
            data = bytes(item)
        elif isinstance(item, Picture):
            data = repr((item.pixels.shape, item.label, item.text)).encode() + np.ascontiguousarray(item.pixels).tobytes()
        else:
            return None
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _items(content) -> list[dict]:
    return [content] if isinstance(content, dict) else list(content)  # chatfmt.check_messages checked it


def _text_only(content, what: str) -> str:
    if isinstance(content, str):
        return content
    items = _items(content)
    if any(i.get("type") != "text" for i in items):
        raise InputError(f"{what} can hold text only — put images in a user message")
    return " ".join(str(i.get("text", "")) for i in items)
