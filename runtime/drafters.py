"""Drafters for speculative decoding (runtime/speculative.py): cheap guesses of the next tokens.

Every drafter has `draft(history, k) -> list[int]`, at most k token ids guessed to follow
`history` (the cached prompt's keys, an image position being a tuple, then the answer's tokens).
A guess is only a guess: the model checks it, so a bad one costs time, never a changed answer.

- PromptLookup: the last n tokens seen earlier in the prompt or the answer, and what followed
  them there (report templates, lab values and prior reports repeat text).
- DraftModel: a small model sharing the vocabulary (Gemma 3 270M for MedGemma 4B) decoding greedily
  on the text of the conversation (it does not see images).
- ForcedText: where a grammar (a JSON schema's keys, quotes, enum values) admits one character
  only, that text, tokenized.
- Grammatical: another drafter's guess, cut at the first token the grammar refuses.
- Chain: the first of several drafters that guesses anything.
"""

from __future__ import annotations

import os

import numpy as np

from medgemma_edge.runtime.errors import InputError

VOCAB_SLACK = 128  # vocabulary sizes may differ by this much (llama.cpp's common/speculative.cpp)
VOCAB_FROM = 5  # ids below this (pad, eos, bos, unk, mask) need not agree


class PromptLookup:
    """Guess by n-gram: find the latest earlier place where the answer's last n tokens occurred
    (n from `max_n` down to `min_n`) and guess the tokens that followed there."""

    def __init__(self, max_n: int = 3, min_n: int = 1):
        self.max_n, self.min_n = max_n, min_n

    def draft(self, history: list, k: int) -> list[int]:
        if k < 1 or len(history) < self.min_n + 1:
            return []
        ids = np.fromiter((t if isinstance(t, int) else -1 for t in history), dtype=np.int64, count=len(history))
        for n in range(min(self.max_n, len(ids) - 1), self.min_n - 1, -1):
            tail = ids[-n:]
            if (tail < 0).any():
                continue
            # every start i < len - n where ids[i:i+n] == tail, latest first
            hits = np.flatnonzero(ids[:len(ids) - n] == tail[0])
            for j in range(1, n):
                hits = hits[ids[hits + j] == tail[j]]
            for i in hits[::-1]:
                follow = ids[i + n:i + n + k]
                cut = np.flatnonzero(follow < 0)
                follow = follow[:cut[0]] if len(cut) else follow
                if len(follow):
                    return [int(t) for t in follow]
        return []


class DraftModel:
    """Greedy guesses from a small llama.cpp model with the same vocabulary (`check_vocabularies`).

    The draft keeps its own cache of the conversation's text (images left out) and guesses k tokens
    one by one; the next call keeps what still matches (sync_prefix)."""

    def __init__(self, engine):
        self.engine = engine

    @classmethod
    def open(cls, gguf_path, target, *, threads: int | None = None, n_ctx: int | None = None) -> "DraftModel":
        from medgemma_edge.runtime.backends.llama_engine import LlamaEngine

        path = os.fspath(gguf_path)
        if not os.path.isfile(path):
            raise InputError(f"draft model {os.path.basename(path)} not found — pass a GGUF that shares the "
                             "model's vocabulary (Gemma 3 270M for MedGemma 4B)")
        engine = LlamaEngine(path, n_ctx=n_ctx or target.n_ctx, threads=threads)
        try:
            check_vocabularies(target, engine, os.path.basename(path))
        except InputError:
            engine.close()
            raise
        return cls(engine)

    def draft(self, history: list, k: int) -> list[int]:
        text = [t for t in history if isinstance(t, int)]
        e = self.engine
        if k < 1 or not text or len(text) + k > e.n_ctx:
            return []
        e.eval_tokens(text[e.sync_prefix(text):])
        out = []
        for i in range(k):
            tok = int(np.argmax(e.logits()))
            if e.is_end(tok):
                break
            out.append(tok)
            if i + 1 < k:
                e.eval_tokens([tok])
        return out

    def close(self) -> None:
        self.engine.close()


def check_vocabularies(target, draft, name: str) -> None:
    """InputError unless the draft's vocabulary is the target's: sizes within VOCAB_SLACK and the
    same token text for every shared id from VOCAB_FROM on (as llama.cpp's speculative example)."""
    import llama_cpp

    a, b = target.n_vocab, draft.n_vocab
    if abs(a - b) > VOCAB_SLACK:
        raise InputError(f"draft model {name} has {b} tokens, the model {a} — a draft must share the vocabulary "
                         "(Gemma 3 270M for MedGemma 4B)")
    for i in range(VOCAB_FROM, min(a, b)):
        if llama_cpp.llama_vocab_get_text(target.vocab, i) != llama_cpp.llama_vocab_get_text(draft.vocab, i):
            raise InputError(f"draft model {name}'s token {i} differs from the model's — a draft must share the "
                             "vocabulary (Gemma 3 270M for MedGemma 4B)")


class ForcedText:
    """Guesses the text a grammar forces next: probing one character at a time on a copy of the
    grammar's state, while exactly one character (of those with a token of their own) is allowed
    and the answer may not end there, that character is appended; the text is then tokenized.

    Optional whitespace (JSON's `space` after `{`, `,`, `:`) is a choice the grammar leaves to the
    model; where only whitespace or one other character is allowed, the answer's own habit decides:
    the character that followed the same punctuation last time in the recent text (a space, or none).
    Without such a precedent, or where it was a newline, the forced text ends there.

    Where the forced text runs into a free position, its last token is left out (a model tends to
    write it merged with what follows: a key's closing quote as `":`) unless it opens a value (a
    quote or bracket after a space, colon or comma), which Gemma 3 270M writes as a token of its own
    (benchmarks/bench_speculative.py)."""

    sure = True  # certain text (or the answer's own spacing): runtime/speculative checks it whole
    PROBE = list('"{}[],: \n') + [chr(c) for c in range(32, 127) if chr(c) not in '"{}[],: '] + ["\t"]
    RECENT = 48  # tokens of the answer read for its spacing habit

    def __init__(self, constraint, engine, max_chars: int = 48):
        self.constraint, self.engine, self.max_chars = constraint, engine, max_chars
        self.chars: list[tuple[str, int]] = []
        for ch in self.PROBE:
            ids = engine.tokenize(ch, special=False)
            if len(ids) == 1:
                self.chars.append((ch, ids[0]))
        self.ends = sorted(engine.end_ids())
        self._ids = np.array([t for _, t in self.chars] + self.ends, dtype=np.int32)  # one probe per position

    def draft(self, history: list, k: int) -> list[int]:
        recent = b"".join(self.engine.piece(t) for t in history[-self.RECENT:] if isinstance(t, int))
        recent = recent.decode("utf-8", errors="ignore")
        probe = self.constraint.copy()
        free = False  # stopped where the grammar allows several characters (or none)
        try:
            text = ""
            while len(text) < self.max_chars:
                ok = probe.allowed(self._ids)
                if ok[len(self.chars):].any():  # the answer may end here
                    break
                step = self._next_char(ok, recent + text)
                if step is None:
                    free = True
                    break
                text += step[0]
                probe.accept(step[1])
        finally:
            probe.close()
        ids = self.engine.tokenize(text, special=False) if text else []
        whole = recent + text
        opens = len(whole) > 1 and whole[-1] in '"[{' and whole[-2] in ' :,[{'  # a value begins
        return ids[:len(ids) - (free and not opens)][:k]

    def _next_char(self, ok, before: str):
        """(char, token) when the grammar allows (`ok`, per probed character) exactly one character,
        or only whitespace and one other character (the answer's habit picks: `_habit`); else None."""
        found, spaces = None, []
        for (ch, t), allowed in zip(self.chars, ok):
            if allowed:
                if ch.isspace():
                    spaces.append((ch, t))
                elif found is not None:
                    return None
                else:
                    found = (ch, t)
        if not spaces:
            return found
        if found is None or not before:
            return None
        habit = _habit(before)
        if habit is None:
            return None
        return found if habit == "" else next((s for s in spaces if s[0] == habit), None)


def _habit(text: str) -> str | None:
    """What followed the last character of `text` at its previous occurrence: " " (a space),
    "" (no whitespace), None where there is no precedent or it was other whitespace."""
    at = text.rfind(text[-1], 0, len(text) - 1)
    if at < 0:
        return None
    after = text[at + 1]
    return after if after == " " else (None if after.isspace() else "")


class Grammatical:
    """Another drafter's guess cut at the first token the grammar refuses (a certain miss)."""

    def __init__(self, drafter, constraint):
        self.drafter, self.constraint = drafter, constraint

    def draft(self, history: list, k: int) -> list[int]:
        guess = self.drafter.draft(history, k) if self.drafter is not None else []
        if not guess:
            return []
        probe = self.constraint.copy()
        try:
            for i, tok in enumerate(guess):
                if not probe.allows(int(tok)):
                    return guess[:i]
                probe.accept(int(tok))
        finally:
            probe.close()
        return guess


class Chain:
    """The first drafter's guess that is not empty."""

    def __init__(self, *drafters):
        self.drafters = [d for d in drafters if d is not None]
        self.source = None  # the drafter whose guess the last call returned

    def draft(self, history: list, k: int, want: int | None = None) -> list[int]:
        """`want`: at most this many guesses from a drafter that is not `sure` (k from one that is)."""
        for d in self.drafters:
            n = k if want is None or getattr(d, "sure", False) else min(k, want)
            guess = d.draft(history, n)[:n]
            if guess:
                self.source = d
                return guess
        self.source = None
        return []
