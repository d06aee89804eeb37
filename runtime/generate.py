"""Token selection and the decode loop: greedy by default (the model card's advice), sampling on request."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from runtime.errors import InputError

END_OF_TURN, EOS = 106, 1
THOUGHT_TOKENS = (100, 101)  # <unused94>, <unused95>: rendered as text so the thought can be split


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise InputError("temperature must be 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            raise InputError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise InputError("top_k must be 0 (off) or more")


def pick_token(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    if s.temperature == 0:
        return int(np.argmax(logits))
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
    return int(rng.choice(len(p), p=p))


class _Utf8Stream:
    """Joins token bytes and releases only complete UTF-8 characters."""

    def __init__(self):
        self.pending = b""

    def push(self, data: bytes) -> str:
        self.pending += data
        for cut in range(len(self.pending), max(len(self.pending) - 4, -1), -1):
            try:
                text = self.pending[:cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            self.pending = self.pending[cut:]
            return text
        return ""

    def flush(self) -> str:
        text, self.pending = self.pending.decode("utf-8", errors="replace"), b""
        return text


def decode(engine, s: Sampling, stats: dict):
    """Generate after the evaluated prompt; yields text pieces, then returns (raw_text, n, reason).

    Text is held back while it could still be the start of a stop string, so a stop string is
    never shown in part.
    """
    rng = np.random.default_rng(s.seed)
    out, shown, n, reason = "", 0, 0, "length"
    utf8 = _Utf8Stream()
    hold = max((len(x) for x in s.stop), default=1) - 1
    t_start = time.perf_counter()
    for n in range(1, s.max_new_tokens + 1):
        tok = pick_token(engine.logits(), s, rng)
        if n == 1:
            stats["ttft_s"] = round(time.perf_counter() - stats["_t0"], 4)
        if tok in (END_OF_TURN, EOS):
            reason, n = "stop", n - 1
            break
        out += utf8.push(engine.piece(tok, special=tok in THOUGHT_TOKENS))
        hit = min((i for i in (out.find(x) for x in s.stop) if i >= 0), default=-1)
        if hit >= 0:
            out, reason = out[:hit], "stop"
            break
        if len(out) - hold > shown:
            yield out[shown:len(out) - hold]
            shown = len(out) - hold
        if n == s.max_new_tokens or engine.n_past + 1 > engine.n_ctx:
            break  # "length": asked-for tokens or the context is used up
        engine.eval_tokens([tok])
    out += utf8.flush()
    if len(out) > shown:
        yield out[shown:]
    elapsed = time.perf_counter() - t_start
    stats["decode_tok_s"] = round(max(n - 1, 0) / elapsed, 2) if elapsed > 0 and n > 1 else None
    return out, n, reason
