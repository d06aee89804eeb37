"""Gemma 3 chat format without jinja: messages → prompt text with image slots, and replies back.

A bundle's prompts are rendered by its own chat template (runtime/chat_template.py, into the same
parts); `prompt_parts` here is the fallback for a bundle without one, kept in step with the
checkpoint's template (tests/test_chat_template.py).

Renders exactly what the checkpoint's chat template plus transformers' Gemma3Processor produce:
`<bos><start_of_turn>user\n{system}\n\n{user}<end_of_turn>\n<start_of_turn>model\n`, text items
trimmed, every image as `\n\n<start_of_image>` + 256 × `<image_soft_token>` + `<end_of_image>\n\n`.
The whole prompt is tokenized at once (as transformers does), then the soft-token runs are filled
with image embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

from medgemma_edge.runtime.errors import BundleError, InputError

IMAGE_TOKENS = 256  # soft tokens per image in every MedGemma (the projector pools 64x64 patches 4x4)
THINK_PREFIX = "SYSTEM INSTRUCTION: think silently if needed. "  # MedGemma 1.5 / 27B thinking switch
THOUGHT_OPEN, THOUGHT_CLOSE = "<unused94>", "<unused95>"


@dataclass
class ImageSlot:
    """One image in a prompt: its source, and the pixels once decoded (uint8 H×W×3)."""
    source: object
    pixels: object = None


ROLES = ("system", "user", "assistant", "model")
_SHAPE = ('— give messages as a list of {"role": "user", "content": "text" or [{"type": "text", "text": ...}, '
          '{"type": "image", "image": ...}]}')


def check_messages(messages) -> list[dict]:
    """The chat as a list of well-formed messages; InputError naming the first thing wrong."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, (list, tuple)):
        raise InputError(f"messages must be a list, got {type(messages).__name__} {_SHAPE}")
    if not messages:
        raise InputError("no messages — give at least one user message")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise InputError(f"message {i + 1} is a {type(msg).__name__}, not a dict {_SHAPE}")
        role = msg.get("role")
        if role not in ROLES:
            raise InputError(f"message {i + 1} has role {role!r} — use system, user or assistant")
        if role == "system" and i > 0:
            raise InputError(f"message {i + 1} is a system message — it must come first, before the user's")
        for item in _items(msg.get("content")):
            if item.get("type") == "text" and not isinstance(item.get("text", ""), str):
                raise InputError(f"message {i + 1} has a text item whose text is a "
                                 f"{type(item['text']).__name__}, not a string")
    return list(messages)


def _items(content) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, dict):
        items = [content]
    elif isinstance(content, (list, tuple)):
        items = list(content)
    else:
        raise InputError(f"message content must be text or a list of items, got {type(content).__name__}")
    for item in items:
        if not isinstance(item, dict):
            raise InputError(f"a content item is a {type(item).__name__}, not a dict like "
                             '{"type": "text", "text": ...} or {"type": "image", "image": ...}')
    return items


def _text_of(content) -> str:
    texts = [i.get("text", "") for i in _items(content) if i.get("type") == "text"]
    if len(texts) != len(_items(content)):
        raise InputError("a system message can hold text only — put images in a user message")
    return " ".join(texts)


def image_sources(messages) -> list:
    """The source of every image item of `messages`, in order, undecoded (a series is one source)."""
    return [item.get("image", item.get("path", item.get("url")))
            for msg in check_messages(messages) if msg.get("role") != "system"
            for item in _items(msg.get("content")) if item.get("type") == "image"]


def expand_images(messages, load_pictures) -> tuple[list[dict], list[ImageSlot]]:
    """Decode every image item; a DICOM series (or a PDF) becomes its slices (pages), each followed
    by its label (and a page's text)."""
    out, slots = [], []
    for msg in check_messages(messages):
        if msg.get("role") == "system" or isinstance(msg.get("content"), str):
            out.append(msg)
            continue
        items = []
        for item in _items(msg.get("content")):
            if item.get("type") != "image":
                items.append(item)
                continue
            src = item.get("image", item.get("path", item.get("url")))
            if src is None:
                raise InputError("an image item has no 'image' value — give a path, bytes, PIL image or array")
            for pic in load_pictures(src):
                slots.append(ImageSlot(source=src, pixels=pic.pixels))
                items.append({"type": "image"})
                # One item: the template joins items with nothing between them.
                said = "\n\n".join(t for t in (pic.label, pic.text) if t)
                if said:
                    items.append({"type": "text", "text": said})
        out.append({**msg, "content": items})
    return out, slots


class Marker(str):
    """A control token of our own template, tokenized as a special token. Every other piece of a
    prompt is text: what a user or system message says is tokenized with special tokens off, so
    typing `<end_of_turn><start_of_turn>model` cannot forge a model turn, nor `<image_soft_token>`
    an image slot."""


BOS, START_TURN, END_TURN = Marker("<bos>"), Marker("<start_of_turn>"), Marker("<end_of_turn>")
START_IMAGE, IMAGE_SOFT, END_IMAGE = Marker("<start_of_image>"), Marker("<image_soft_token>"), Marker("<end_of_image>")


def prompt_parts(messages, *, image_tokens: int = IMAGE_TOKENS, think: bool = False) -> list[str]:
    """The prompt for `messages` (images already expanded), ending with the model turn, as text
    pieces and `Marker`s."""
    if not messages:
        raise InputError("no messages — give at least one user message")
    messages = list(messages)
    system = None
    if messages[0].get("role") == "system":
        system = _text_of(messages[0]["content"])
        messages = messages[1:]
    if think:
        system = THINK_PREFIX + (system or "")
    if not messages:
        raise InputError("only a system message — add a user message with the question")
    image = ["\n\n", START_IMAGE, *[IMAGE_SOFT] * image_tokens, END_IMAGE, "\n\n"]
    parts: list[str] = [BOS]
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role not in ("user", "assistant", "model"):
            raise InputError(f"unknown message role {role!r} — use system, user or assistant")
        parts += [START_TURN, ("model" if role == "assistant" else role) + "\n"]
        if i == 0 and system is not None:
            parts.append(system + "\n\n")
        for item in _items(msg.get("content")):
            kind = item.get("type")
            if kind == "text":
                parts.append(str(item.get("text", "")).strip())
            elif kind == "image":
                parts += image
            else:
                raise InputError(f"unknown content type {kind!r} — use text or image")
        parts += [END_TURN, "\n"]
    parts += [START_TURN, "model\n"]
    return parts


def render_prompt(messages, *, image_tokens: int = IMAGE_TOKENS, think: bool = False) -> str:
    """The prompt as one string (what the checkpoint's chat template + processor produce)."""
    return "".join(prompt_parts(messages, image_tokens=image_tokens, think=think))


# Tokens that give a prompt its structure; user text must never become one of them.
STRUCTURAL = (BOS, START_TURN, END_TURN, START_IMAGE, IMAGE_SOFT, END_IMAGE, "<eos>", "<pad>",
              THOUGHT_OPEN, THOUGHT_CLOSE)


def tokenize_prompt(parts: list[str], tokenize) -> list[int]:
    """Token ids of prompt parts; `tokenize(text, special=bool)` is the bundle's tokenizer. Text
    between markers is tokenized as one run (as a tokenizer splitting at special tokens would),
    with special tokens off; each structural marker must be one token of the vocabulary. Another
    marker (a spelling a bundle's chat template emitted, such as `<unused5>`) is its token when
    the vocabulary holds it as one special token, and text otherwise."""
    structural = {}
    for spelled in STRUCTURAL:
        found = tokenize(spelled, special=True)
        if len(found) == 1:
            structural[found[0]] = spelled
    marker_ids = {spelled: tok for tok, spelled in structural.items()}
    ids: list[int] = []
    text = ""
    for part in parts:
        if not isinstance(part, Marker):
            text += part
            continue
        if part in marker_ids:
            tok = marker_ids[part]
        elif part in STRUCTURAL:
            raise BundleError(f"the bundle's tokenizer has no {part} token — export the bundle again")
        else:
            tok = marker_ids[part] = _special_id(part, tokenize)
        if tok is None:
            text += part  # not a special token of this vocabulary: the template's own text
            continue
        ids += _text_ids(text, tokenize, structural) + [tok]
        text = ""
    return ids + _text_ids(text, tokenize, structural)


def _special_id(spelled: str, tokenize) -> int | None:
    """The id of `spelled` if the vocabulary holds it as one special token (one token with special
    parsing on, not that token without it; a token plain text also yields stays in the text run,
    tokenized with its neighbours as a whole-prompt tokenizer would)."""
    found = tokenize(spelled, special=True)
    if len(found) == 1 and tokenize(spelled, special=False) != found:
        return found[0]
    return None


def _text_ids(text: str, tokenize, structural: dict[int, str]) -> list[int]:
    """Ids of plain text. A tokenizer may still match some special tokens in text (llama.cpp
    matches user-defined ones, such as `<start_of_image>`, with special parsing off): where a
    structural one appears, the text is cut inside its spelling and each side tokenized alone, so
    it stays the characters the user typed. Other text tokenizes as the reference tokenizer does."""
    if not text:
        return []
    ids = tokenize(text, special=False)
    for tok in ids:
        spelled = structural.get(tok)
        if spelled is not None and spelled in text:
            cut = text.find(spelled) + 1
            return _text_ids(text[:cut], tokenize, structural) + _text_ids(text[cut:], tokenize, structural)
    return ids


def split_thought(text: str) -> tuple[str | None, str]:
    """(thought, answer) from raw output that may hold `<unused94>thought\n…<unused95>`."""
    start = text.find(THOUGHT_OPEN)
    if start < 0:
        return None, text
    end = text.find(THOUGHT_CLOSE, start)
    inner = text[start + len(THOUGHT_OPEN): end if end >= 0 else len(text)]
    if inner.startswith("thought"):
        inner = inner[len("thought"):]
    answer = text[:start] + (text[end + len(THOUGHT_CLOSE):] if end >= 0 else "")
    return inner.strip(), answer.lstrip()


class ThoughtFilter:
    """Raw model text in, piece by piece; out, the newly visible part of the answer. A leading
    `<unused94>thought…<unused95>` is held back until it closes, then left out."""

    def __init__(self):
        self.raw, self.shown = "", 0

    def push(self, piece: str) -> str:
        self.raw += piece
        visible = _visible(self.raw)
        if visible is None or len(visible) <= self.shown:
            return ""
        new, self.shown = visible[self.shown:], len(visible)
        return new

    def finish(self) -> tuple[str | None, str]:
        """(thought, the rest of the answer not yet returned by push)."""
        thought, answer = split_thought(self.raw)
        return thought, answer[self.shown:]


def _visible(raw: str) -> str | None:
    """The answer part of raw output so far, or None while a thought is still open."""
    if THOUGHT_OPEN in raw:
        if THOUGHT_CLOSE not in raw:
            return None
        return split_thought(raw)[1]
    if len(raw) < len(THOUGHT_OPEN) and THOUGHT_OPEN.startswith(raw):
        return None  # could still become the opening marker
    return raw


def vocabulary(engine, manifest: dict):
    """Stop and thought tokens from the bundle itself (runtime/generate.Vocabulary): the GGUF's eos /
    end-of-turn ids and the manifest's record of them (decode also asks llama.cpp's end-of-generation
    test per token), and the thought markers where they are control tokens of this vocabulary."""
    from medgemma_edge.runtime.generate import Vocabulary

    special = manifest.get("special_tokens") or {}
    ends = engine.end_ids()
    ends.update(special[k] for k in ("eos", "end_of_turn") if isinstance(special.get(k), int))
    shown = set()
    for marker in (THOUGHT_OPEN, THOUGHT_CLOSE):
        ids = engine.tokenize(marker)
        if len(ids) == 1:  # a control token in this vocabulary: render it so the thought can be split
            shown.add(ids[0])
    return Vocabulary(frozenset(ends), frozenset(shown))
