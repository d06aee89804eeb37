"""What a chat returns: `Model.stream` yields `Response`s, `Model.chat` joins them into a `Reply`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medgemma_edge.runtime.boxes import Box


@dataclass
class Stats:
    """Per-stage numbers of one answer (seconds unless named otherwise)."""
    load_s: float | None = None  # loading the bundle (once per Model)
    preprocess_ms: float | None = None  # decode, window, fit and resize every picture
    images: int = 0
    images_from_cache: int = 0  # images whose embeddings came from the image cache
    image_encode_s: float | None = None
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt positions not evaluated again (kept from before, or restored)
    restored_tokens: int = 0  # of those, restored from a prefix saved on disk (a prepared study)
    prefill_tok_s: float | None = None
    ttft_s: float | None = None  # from the call to the first token
    decode_tok_s: float | None = None
    peak_rss_mb: float | None = None
    # an answer the repetition guard stopped (finish_reason "repetition", runtime/repetition.py):
    # the period of its loop and how many of its last tokens repeat it; None otherwise
    repetition_period: int | None = None
    repetition_tokens: int | None = None
    # a JSON answer cut by the token limit and closed at its last complete entry: the characters
    # dropped (runtime/json_close.py); None when not closed
    json_closed: int | None = None
    # speculative decoding (runtime/speculative.py): tokens guessed, and of them those the model picked
    drafted_tokens: int | None = None
    accepted_tokens: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Response:
    """One streamed piece: `text` is the newly visible answer text (may be empty: a thought, or text
    held back while it could still become a stop string); the last one has finish_reason, the
    thought, the stats and the answer's boxes."""
    text: str
    token: int | None  # the token generated at this step (None on the last)
    prompt_tokens: int
    completion_tokens: int  # so far
    finish_reason: str | None = None  # "stop", "length" or "repetition", on the last response only
    thought: str | None = None
    stats: Stats | None = None
    # on the last: the answer's box_2d entries on the original picture, when the chat's images were
    # one picture (runtime/boxes.answer_boxes, with the sizes the prompt's own decode found)
    boxes: list[Box] = field(default_factory=list)


@dataclass
class Reply:
    text: str
    thought: str | None
    finish_reason: str  # "stop" (end of turn, eos or a stop string), "length" or "repetition" (a loop)
    prompt_tokens: int
    completion_tokens: int
    stats: Stats = field(default_factory=Stats)
    boxes: list[Box] = field(default_factory=list)  # as on the last Response
