"""Gemma 3 chat format without jinja: messages → prompt text with image slots, and replies back.

Renders exactly what the checkpoint's chat template plus transformers' Gemma3Processor produce:
`<bos><start_of_turn>user\n{system}\n\n{user}<end_of_turn>\n<start_of_turn>model\n`, text items
trimmed, every image as `\n\n<start_of_image>` + 256 × `<image_soft_token>` + `<end_of_image>\n\n`.
The whole prompt is tokenized at once (as transformers does), then the soft-token runs are filled
with image embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.errors import InputError

THINK_PREFIX = "SYSTEM INSTRUCTION: think silently if needed. "  # MedGemma 1.5 / 27B thinking switch
THOUGHT_OPEN, THOUGHT_CLOSE = "<unused94>", "<unused95>"


@dataclass
class ImageSlot:
    """One image in a prompt: its source, and the pixels once decoded (uint8 H×W×3)."""
    source: object
    pixels: object = None


@dataclass
class Reply:
    text: str
    thought: str | None
    finish_reason: str  # "stop" (end of turn, eos or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    stats: dict = field(default_factory=dict)


def _items(content) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, dict):
        return [content]
    if isinstance(content, (list, tuple)):
        return list(content)
    raise InputError(f"message content must be text or a list of items, got {type(content).__name__}")


def _text_of(content) -> str:
    texts = [i.get("text", "") for i in _items(content) if i.get("type") == "text"]
    if len(texts) != len(_items(content)):
        raise InputError("a system message can hold text only — put images in a user message")
    return " ".join(texts)


def expand_images(messages, load_pictures) -> tuple[list[dict], list[ImageSlot]]:
    """Decode every image item; a DICOM series becomes its slices, each followed by its label."""
    out, slots = [], []
    for msg in messages:
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
                if pic.label:
                    items.append({"type": "text", "text": pic.label})
        out.append({**msg, "content": items})
    return out, slots


def render_prompt(messages, *, image_tokens: int = 256, think: bool = False) -> str:
    """The prompt text for `messages` (images already expanded), ending with the model turn."""
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
    image = "\n\n<start_of_image>" + "<image_soft_token>" * image_tokens + "<end_of_image>\n\n"
    parts = ["<bos>"]
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role not in ("user", "assistant", "model"):
            raise InputError(f"unknown message role {role!r} — use system, user or assistant")
        parts.append("<start_of_turn>" + ("model" if role == "assistant" else role) + "\n")
        if i == 0 and system is not None:
            parts.append(system + "\n\n")
        for item in _items(msg.get("content")):
            kind = item.get("type")
            if kind == "text":
                parts.append(str(item.get("text", "")).strip())
            elif kind == "image":
                parts.append(image)
            else:
                raise InputError(f"unknown content type {kind!r} — use text or image")
        parts.append("<end_of_turn>\n")
    parts.append("<start_of_turn>model\n")
    return "".join(parts)


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
