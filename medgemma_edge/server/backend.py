"""What the HTTP server answers with: the local model, or an upstream OpenAI-compatible engine.

Both take a chat in the runtime's own message format (runtime/chat.py: `{"role", "content"}` with
`{"type": "text"}` and `{"type": "image", "image": SOURCE}` items, SOURCE being anything
`runtime.sources.load_pictures` reads: bytes of a PNG/JPEG/DICOM file, a list of DICOM bytes
for a series, or already-decoded `Picture`s) and yield `runtime.reply.Response`s, the last one
carrying finish_reason and stats; the local model yields `runtime.progress.Progress` items before
the first token too (images encoded, prompt evaluated; server/chat.py streams them). `cancelled()`
is polled once per item: when it turns true the backend stops and releases the model at once (a
client that went away).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from medgemma_edge.runtime.generate import DEFAULT_MAX_NEW_TOKENS
from medgemma_edge.runtime.picture import DEFAULT_MAX_SLICES
from medgemma_edge.runtime.reply import Response


class Backend(Protocol):
    model_id: str  # what /v1/models lists and responses name
    notice: str | None  # shown by the kiosk page (e.g. the demo model's warning)
    # Optional: `max_prompt_chars`, more characters of text than can fit the context; the server
    # refuses a longer prompt before queueing it (server/chat.py). Without it, the backend judges.
    # The last Response carries the answer's `boxes` on the one picture asked about (runtime/boxes
    # .answer_boxes, from the sizes the backend's own decode found); server/chat.py shows them.

    def chat(self, messages: list[dict], options: dict, cancelled: Callable[[], bool]) -> Iterator[Response]:
        """options: max_tokens, temperature, top_p, top_k, seed, stop, think, window, max_slices, fit,
        json_schema (the answer is JSON valid for it) or grammar (GBNF; server/tools.py), repetition_guard
        (runtime/repetition.py; the local model's decode loop runs it, an upstream engine decodes itself)."""

    def prepare(self, messages: list[dict], options: dict) -> None:
        """Do the image work of `messages` now (decode, window, resize, encode into the image
        cache), so a later chat about the same images starts at the question."""


class LocalBackend:
    """The bundle loaded in this process (`medgemma_edge.load`)."""

    def __init__(self, model):
        self.model = model
        self.model_id = model.manifest.get("source", {}).get("path_name") or model.bundle.name
        self.notice = model.demo_notice
        self.image_size = model.image_size  # optional for a Backend: the size of upload previews
        self.max_prompt_chars = prompt_char_bound(model)

    def chat(self, messages, options, cancelled) -> Iterator[Response]:
        stream = self.model.stream(messages, max_new_tokens=options.get("max_tokens", DEFAULT_MAX_NEW_TOKENS),
                                   temperature=options.get("temperature", 0.0), top_p=options.get("top_p", 1.0),
                                   top_k=options.get("top_k", 0), seed=options.get("seed"),
                                   stop=options.get("stop") or (), think=options.get("think", False),
                                   window=options.get("window"),
                                   max_slices=options.get("max_slices", DEFAULT_MAX_SLICES),
                                   fit=options.get("fit"), json_schema=options.get("json_schema"),
                                   grammar=options.get("grammar"),
                                   repetition_guard=options.get("repetition_guard", True), progress=True)
        try:
            for response in stream:
                yield response
                if cancelled():
                    return
        finally:
            stream.close()  # frees the model now, not when the generator is collected

    def prepare(self, messages, options) -> None:
        self.model.prepare(messages, window=options.get("window"),
                           max_slices=options.get("max_slices", DEFAULT_MAX_SLICES),
                           fit=options.get("fit"))

    def prepare_steps(self, messages, options, should_pause=None):
        """`prepare` in bounded steps, for the worker's background lane (runtime/prepare_steps.py)."""
        return self.model.prepare_steps(messages, window=options.get("window"),
                                        max_slices=options.get("max_slices", DEFAULT_MAX_SLICES),
                                        fit=options.get("fit"), should_pause=should_pause)


def prompt_char_bound(model) -> int | None:
    """The most characters of prompt text that could fit `model`'s context; None when the context
    has no end. Sound, not tight: a prompt's tokens spell it out piece by piece, and no piece is
    longer than the vocabulary's longest (counted in UTF-8 bytes, so at least its characters), so
    more than context × longest characters need more tokens than the context holds. The longest
    piece is read from the vocabulary once, when the backend is made."""
    engine = model.engine
    tokens = engine.n_ctx_train if model.auto_context else engine.n_ctx  # auto grows up to n_ctx_train
    if not tokens:
        return None
    vocab = getattr(engine, "vocab", None)
    size = getattr(vocab, "n_vocab", None) or engine.n_vocab  # the tokenizer's entries, not padded rows
    longest = max(len(engine.piece(t, special=True)) for t in range(size))
    return tokens * longest
