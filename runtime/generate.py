"""Token selection and the decode loop: greedy by default (the model card's advice), sampling on request.

Every backend (llama.cpp, onnxruntime) and every kind of answer (plain, thinking, held to a grammar)
is decoded here, so each gets the stop strings and the repetition guard (runtime/repetition.py)."""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.repetition import Loop, RepetitionGuard
from medgemma_edge.runtime.speculative import sample_with_draft

DEFAULT_MAX_NEW_TOKENS = 256  # answer length when a caller names none (Model, `ask`, the server)
CUT = ("length", "repetition")  # finish reasons of an answer cut before the model ended it


@dataclass
class Sampling:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_guard: bool = True  # stop an answer that loops (runtime/repetition.py), finish_reason "repetition"

    def check(self) -> None:
        _kind("max_new_tokens", self.max_new_tokens, int)
        _kind("temperature", self.temperature, float)
        _kind("top_p", self.top_p, float)
        _kind("top_k", self.top_k, int)
        if self.seed is not None:
            _kind("seed", self.seed, int)
        if not all(isinstance(x, str) and x for x in self.stop):
            raise InputError("stop must be a string or a list of non-empty strings")
        if not isinstance(self.repetition_guard, bool):
            raise InputError(f"repetition_guard must be True or False, got {type(self.repetition_guard).__name__}")
        if self.max_new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise InputError("temperature must be 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            raise InputError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise InputError("top_k must be 0 (off) or more")


def _kind(name: str, value, kind) -> None:
    """An option of the right type (a float option takes ints too; bools are neither)."""
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not ok:
        raise InputError(f"{name} must be {'a number' if kind is float else 'an integer'}, "
                         f"got {type(value).__name__} {value!r:.40}")


@dataclass(frozen=True)
class Vocabulary:
    """What decoding must know of the bundle's tokens, read from the bundle (not hard-coded), so a
    fine-tuned or future MedGemma with other ids still stops and still shows its thought."""
    end_ids: frozenset[int]  # any of these ends the answer (so does llama.cpp's is_eog)
    shown_special_ids: frozenset[int]  # control tokens rendered as text (the thought markers)


@dataclass
class Step:
    """One decoding step: the token picked and the text it completes (held back while it may still
    become a stop string or an unfinished UTF-8 character); the last step has finish_reason set."""
    token: int | None
    text: str
    # "stop" (end token or stop string), "length" (max_new_tokens or the context) or "repetition"
    finish_reason: str | None = None
    loop: Loop | None = None  # with "repetition": the loop the answer fell into


def pick_token(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    if s.temperature == 0:
        return int(np.argmax(logits))
    p = probabilities(logits, s)
    return int(rng.choice(len(p), p=p))


def probabilities(logits: np.ndarray, s: Sampling) -> np.ndarray:
    """The sampling distribution (float64, sums to 1) after temperature, top_k and top_p."""
    z = logits.astype(np.float64) / s.temperature
    if s.top_k:
        kth = np.partition(z, -s.top_k)[-s.top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if s.top_p < 1:
        order = np.argsort(-p)
        cum = np.cumsum(p[order])
        cut = order[np.searchsorted(cum, s.top_p) + 1:]
        p[cut] = 0
        p /= p.sum()
    return p


GREEDY_TRIES = 32  # best tokens tried one by one (a lookup each) before masking the whole vocabulary
SAMPLE_TRIES = 64  # draws tried one by one before masking


def choose_token(logits: np.ndarray, s: Sampling, rng: np.random.Generator, constraint=None) -> int:
    """pick_token, within a grammar when given one (runtime/constrain.Constraint).

    The grammar is asked about single tokens first: greedy takes the best token it allows among the
    GREEDY_TRIES best (the argmax of the masked logits, when it is among them); sampling draws from
    the free distribution until a draw is allowed, which is exactly a draw from the distribution
    restricted to the allowed tokens (rejection sampling). Only when every try is refused is the whole
    vocabulary masked and the pick made from what is left — the same answer, without a pass over
    every candidate on most steps.
    """
    if constraint is None:
        return pick_token(logits, s, rng)
    if s.temperature == 0:
        top = int(np.argmax(logits))  # most steps: the model's own pick is allowed (one pass, no sort)
        if constraint.allows(top):
            return top
        k = min(GREEDY_TRIES, len(logits) - 1)
        best = np.argpartition(-logits, k)[:k]
        for tok in best[np.lexsort((best, -logits[best]))]:  # by logit, ties by id as argmax
            if constraint.allows(int(tok)):
                return int(tok)
    else:
        for tok in rng.choice(len(logits), size=SAMPLE_TRIES, p=probabilities(logits, s)):
            if constraint.allows(int(tok)):
                return int(tok)
    return pick_token(constraint.mask(logits), s, rng)


def decode(engine, s: Sampling, vocab: Vocabulary, constraint=None, lookahead=None) -> Iterator[Step]:
    """Generate after the evaluated prompt, one `Step` per token and a last one with the reason.

    Text is held back while it could still be the start of a stop string, so a stop string is
    never shown in part. `constraint` (runtime/constrain.Constraint) keeps the answer inside a
    grammar; it ends only where the grammar allows an end token. With `s.repetition_guard` an answer
    whose last tokens loop stops after the token that completes the rule (runtime/repetition.py),
    that token shown; before "length" if both fall on the same token.
    `lookahead` (runtime/speculative.Lookahead): tokens guessed and verified in batches; each token
    is still picked here exactly as without it (sampled ones by `sample_with_draft`), and the
    unconfirmed guesses leave the cache when the answer ends.
    """
    try:
        yield from _decode(engine, s, vocab, constraint, lookahead)
    finally:
        if lookahead is not None:
            lookahead.drop()


def _decode(engine, s: Sampling, vocab: Vocabulary, constraint, look) -> Iterator[Step]:
    rng = np.random.default_rng(s.seed)
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out, shown, reason = "", 0, "length"
    hold = max((len(x) for x in s.stop), default=1) - 1
    guard, loop = RepetitionGuard() if s.repetition_guard else None, None
    history = list(engine.cached) if look is not None else None  # what drafters read: prompt and answer
    for n in range(1, s.max_new_tokens + 1):
        guess = look.guess() if look is not None else None
        if guess is not None and s.temperature > 0 and constraint is None:
            tok = sample_with_draft(probabilities(look.logits(), s), guess, rng)
        else:
            tok = choose_token(look.logits() if look is not None else engine.logits(), s, rng, constraint)
        if tok in vocab.end_ids or engine.is_end(tok):
            reason = "stop"
            break
        if constraint is not None:
            constraint.accept(tok)
        out += utf8.decode(engine.piece(tok, special=tok in vocab.shown_special_ids))
        hit = min((i for i in (out.find(x) for x in s.stop) if i >= 0), default=-1)
        if hit >= 0:
            yield Step(tok, "")
            yield Step(None, out[shown:hit], "stop")
            return
        new = out[shown:max(len(out) - hold, shown)]
        shown += len(new)
        yield Step(tok, new)
        loop = guard.push(tok) if guard is not None else None
        if loop is not None:
            reason = "repetition"
            break
        if n == s.max_new_tokens or (look or engine).n_past + 1 > engine.n_ctx:
            break  # "length": asked-for tokens or the context is used up
        if look is None:
            engine.eval_tokens([tok])
        else:
            history.append(tok)
            look.advance(tok, history, s.max_new_tokens - n)
    out += utf8.decode(b"", final=True)
    yield Step(None, out[shown:], reason, loop)
