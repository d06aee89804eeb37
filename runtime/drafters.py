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

    Where the forced text runs into a free position, its last token is left out: the model tends to
    write it merged with what follows (a key's closing quote as `":`, measured on Gemma 3 270M), so
    guessing it alone mostly costs a row (benchmarks/bench_speculative.py)."""

    PROBE = list('"{}[],: \n') + [chr(c) for c in range(32, 127) if chr(c) not in '"{}[],: '] + ["\t"]

    def __init__(self, constraint, engine, max_chars: int = 48):
        self.constraint, self.engine, self.max_chars = constraint, engine, max_chars
        self.chars: list[tuple[str, int]] = []
        for ch in self.PROBE:
            ids = engine.tokenize(ch, special=False)
            if len(ids) == 1:
                self.chars.append((ch, ids[0]))
        self.ends = sorted(engine.end_ids())

    def draft(self, history: list, k: int) -> list[int]:
        probe = self.constraint.copy()
        free = False  # stopped where the grammar allows several characters (or none)
        try:
            text = ""
            while len(text) < self.max_chars and not any(probe.allows(t) for t in self.ends):
                only = self._only_char(probe)
                if only is None:
                    free = True
                    break
                text += only[0]
                probe.accept(only[1])
        finally:
            probe.close()
        ids = self.engine.tokenize(text, special=False) if text else []
        return ids[:len(ids) - free][:k]

    def _only_char(self, probe):
        """(char, token) when the grammar allows exactly one probed character, else None; JSON's
        punctuation is probed first, so a free position stops at its second allowed character."""
        found = None
        for ch, t in self.chars:
            if probe.allows(t):
                if found is not None:
                    return None
                found = (ch, t)
        return found


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

    def draft(self, history: list, k: int) -> list[int]:
        for d in self.drafters:
            guess = d.draft(history, k)
            if guess:
                return guess
        return []
