"""The bundle's own chat template (Jinja), rendered as prompt parts.

A bundle carries the chat template its model was trained with (manifest["chat_template"]: the
checkpoint's for an export, `tokenizer.chat_template` for an imported GGUF); a fine-tune's format
is followed exactly. The template is compiled once, in the sandbox and with the globals that
transformers' `apply_chat_template` gives it (raise_exception, strftime_now, the tojson filter,
loop controls, the {% generation %} tag), and rendered on every question.

What comes out are the same parts `chat.prompt_parts` gives — plain text and `Marker`s — so one
rule keeps holding: what a message says is text, never a control token. Each message text is
rendered as a sentinel of private-use characters, the output is cut at the sentinels, and only
the template's own output may become markers (spellings such as `<start_of_turn>`; those the
vocabulary does not hold as one special token fall back to text in `chat.tokenize_prompt`). Each
`<start_of_image>` the template places for an image item becomes the image block Gemma3Processor
makes of it. Without a template the built-in Gemma 3 renderer (`chat.prompt_parts`) is used.
"""

from __future__ import annotations

import json
import re
from datetime import datetime

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from medgemma_edge.runtime import chat as chatfmt
from medgemma_edge.runtime.chat import END_IMAGE, IMAGE_SOFT, IMAGE_TOKENS, START_IMAGE, THINK_PREFIX, Marker
from medgemma_edge.runtime.errors import BundleError, InputError

BOI = "<start_of_image>"  # what a Gemma 3 template emits for an image item (the processor's boi_token)
# Spellings a tokenizer may hold as one special token: the only template text that may become markers.
_SPELLING = re.compile(r"<[^<>\s]{1,64}>")
# Private-use pairs for the sentinels; the first pair the template itself never uses is taken.
_SENTINELS = [(chr(0xE000 + 2 * i), chr(0xE001 + 2 * i)) for i in range(64)]
_WHY = 200  # characters of a template's error message kept in ours


class _Generation(Extension):
    """`{% generation %}…{% endgeneration %}` (transformers' assistant-mask tag): renders its body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _one_line(err: BaseException) -> str:
    why = " ".join(str(err).split()) or type(err).__name__
    return why if len(why) <= _WHY else why[:_WHY - 1] + "…"


def compile_template(source: str):
    """The template compiled as transformers compiles it; BundleError with one line if it cannot be."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as err:
        line = f" (line {err.lineno})" if getattr(err, "lineno", None) else ""
        raise BundleError(f"the bundle's chat template does not compile{line}: {_one_line(err)} — "
                          "fix chat_template in its manifest.json, or export the bundle again") from None


class ChatTemplate:
    """A bundle's chat template; `parts(messages)` is the prompt as `chat.prompt_parts` gives it."""

    def __init__(self, source: str | None, bos_token: str = "<bos>", eos_token: str = "<eos>",
                 boi_token: str = BOI):
        self.source = source or None
        self.boi_token = boi_token
        self.tokens = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": "<pad>", "unk_token": "<unk>",
                       "boi_token": boi_token, "eoi_token": str(END_IMAGE), "image_token": str(IMAGE_SOFT)}
        self._template = compile_template(self.source) if self.source else None
        used = self.source or ""
        self._open, self._close = next((a, b) for a, b in _SENTINELS if a not in used and b not in used)
        self._cut = re.compile(f"{self._open}(\\d+){self._close}")

    @classmethod
    def from_manifest(cls, manifest: dict) -> "ChatTemplate":
        """The template a bundle's manifest carries (None or empty: the built-in Gemma 3 format)."""
        return cls(manifest.get("chat_template"))

    def parts(self, messages, *, image_tokens: int = IMAGE_TOKENS, think: bool = False) -> list[str]:
        """The prompt for `messages` (images already expanded), ending with the model turn, as text
        pieces and `Marker`s."""
        if self._template is None:
            return chatfmt.prompt_parts(messages, image_tokens=image_tokens, think=think)
        held, texts, images = self._held(messages, think)
        real = self._render(self._fill(held, texts))
        out = self._render(held)
        pieces = self._split(out, texts)
        if "".join(pieces) != real:  # the template reads the texts: find them in its real output
            pieces = _locate(real, [t for t in texts if t])
        parts, placed = self._markers(pieces, image_tokens)
        if placed != images:
            raise BundleError(f"the bundle's chat template placed {placed} image(s) for the {images} in the "
                              f"messages (it must emit {self.boi_token} for each image item) — "
                              "fix chat_template in its manifest.json")
        return parts

    # -- steps -------------------------------------------------------------------------------------
    def _held(self, messages, think: bool) -> tuple[list[dict], list[str], int]:
        """The messages with every text replaced by a sentinel (its outer whitespace kept around it,
        so the template's own trimming still applies), the texts by sentinel number, the image count."""
        messages = list(messages or [])
        if not messages:
            raise InputError("no messages — give at least one user message")
        if think:
            system = ""
            if messages[0].get("role") == "system":
                system, messages = chatfmt._text_of(messages[0]["content"]), messages[1:]
            messages = [{"role": "system", "content": THINK_PREFIX + system}] + messages
        if all(m.get("role") == "system" for m in messages):
            raise InputError("only a system message — add a user message with the question")
        texts: list[str] = []
        images = 0

        def hold(text) -> str:
            text = str(text)
            core = text.strip()
            start = len(text) - len(text.lstrip())
            texts.append(core)
            return f"{text[:start]}{self._open}{len(texts) - 1}{self._close}{text[start + len(core):]}"

        held = []
        for i, msg in enumerate(messages):
            role = msg.get("role")
            if role not in chatfmt.ROLES or (role == "system" and i > 0):
                raise InputError(f"message {i + 1} has role {role!r} — use system (first), user or assistant")
            content = msg.get("content")
            if role == "system":
                chatfmt._text_of(content)  # a system message holds text only
            if isinstance(content, str):
                held.append({"role": role, "content": hold(content)})
                continue
            items = []
            for item in chatfmt._items(content):
                kind = item.get("type")
                if kind == "text":
                    items.append({"type": "text", "text": hold(item.get("text", ""))})
                elif kind == "image":
                    items.append({"type": "image"})
                    images += 1
                else:
                    raise InputError(f"unknown content type {kind!r} — use text or image")
            held.append({"role": role, "content": items})
        return held, texts, images

    def _fill(self, held: list[dict], texts: list[str]) -> list[dict]:
        """The held messages with the real texts back (what transformers would render)."""
        def real(s: str) -> str:
            return self._cut.sub(lambda m: texts[int(m.group(1))], s)
        return [{"role": m["role"], "content": real(m["content"]) if isinstance(m["content"], str) else
                 [{**it, "text": real(it["text"])} if "text" in it else it for it in m["content"]]} for m in held]

    def _render(self, messages: list[dict]) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=True, tools=None,
                                         documents=None, **self.tokens)
        except Exception as err:  # raise_exception, undefined values, sandbox refusals, type errors
            raise InputError(f"the bundle's chat template failed on these messages: {_one_line(err)}") from None

    def _split(self, out: str, texts: list[str]) -> list[str]:
        """The rendered output as pieces: message texts as `str`, the template's own text as `_Own`."""
        pieces, pos = [], 0
        for m in self._cut.finditer(out):
            pieces += [_Own(out[pos:m.start()]), texts[int(m.group(1))]]
            pos = m.end()
        pieces.append(_Own(out[pos:]))
        return pieces

    def _markers(self, pieces: list[str], image_tokens: int) -> tuple[list[str], int]:
        """Template text cut at special-token spellings (markers; each boi: an image block), texts
        kept as text; and the number of image blocks."""
        image = ["\n\n", START_IMAGE, *[IMAGE_SOFT] * image_tokens, END_IMAGE, "\n\n"]
        parts: list[str] = []
        placed = 0
        for piece in pieces:
            if not isinstance(piece, _Own):
                if piece:
                    parts.append(str(piece))
                continue
            pos = 0
            for m in _SPELLING.finditer(piece):
                if m.start() > pos:
                    parts.append(str(piece[pos:m.start()]))
                spelled = m.group(0)
                placed += spelled == self.boi_token
                parts += image if spelled == self.boi_token else [_marker(spelled)]
                pos = m.end()
            if pos < len(piece):
                parts.append(str(piece[pos:]))
        return parts, placed


class _Own(str):
    """Text the template itself emitted (may hold markers)."""


_KNOWN = {str(m): m for m in chatfmt.STRUCTURAL if isinstance(m, Marker)}


def _marker(spelled: str) -> Marker:
    return _KNOWN.get(spelled) or Marker(spelled)


def _locate(real: str, texts: list[str]) -> list[str]:
    """Pieces of a render by a template that reads the message texts (its output for them differs
    from its output for sentinels): each message text found, in order, is text; the rest is the
    template's own. Where a text holds a control-token spelling, a text found in the wrong place
    could turn it into a control token: such a message is refused."""
    for text in texts:
        if m := _SPELLING.search(text):
            raise InputError(f"a message holds {m.group(0)}, which this bundle's chat template (it reads the "
                             "message texts) cannot keep apart from its own control tokens — leave it out")
    pieces, pos = [], 0
    for text in texts:
        at = real.find(text, pos)
        if at < 0:
            continue
        pieces += [_Own(real[pos:at]), text]
        pos = at + len(text)
    pieces.append(_Own(real[pos:]))
    return pieces
