"""Exact speculative decoding: tokens drafted cheaply, checked by the model in one batch.

A drafter guesses the next few tokens (runtime/drafters.py: n-grams of the prompt and the answer so
far, a small model sharing the vocabulary, text a grammar forces). The guessed tokens are evaluated
after the chosen one as one batch, which gives the model's logits at every guessed position. The
decode loop (runtime/generate.decode) then picks each token exactly as it would without drafts,
from those logits; while the pick equals the guess, the next logits are already there and no
evaluation is needed. At the first pick that differs, the unconfirmed guesses are dropped from the
cache and decoding goes on from the pick. The answer is the model's: greedy answers are the same
tokens as plain decoding; a sampled answer follows the same distribution (`sample_with_draft`).

What it costs: a batch of k+1 tokens takes longer than one token (the weights are read once, but
every row's logits are computed), so guesses the model refuses slow decoding down; the gain is
measured per machine (benchmarks/bench_speculative.py) and decides the default.

Engines: the batch must return every position's logits (`eval_tokens(ids, rows=True)`), which
llama.cpp's engine does; the ONNX decoder keeps only the last position's and decodes plainly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_DRAFT = 4  # tokens guessed per batch (benchmarks/bench_speculative.py measures 1…8)
SURE_DRAFT = 8  # tokens per batch from a drafter whose guesses are near certain (text a grammar forces)


@dataclass
class SpecStats:
    batches: int = 0  # batches of guessed tokens evaluated
    drafted: int = 0  # tokens guessed
    accepted: int = 0  # of them, picked by the model

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def supports(engine) -> bool:
    """Whether the engine can return every position of a batch (llama.cpp: yes; ONNX: no)."""
    import inspect

    try:
        return "rows" in inspect.signature(engine.eval_tokens).parameters
    except (TypeError, ValueError):
        return False


class Lookahead:
    """The next step's logits for the decode loop, with guessed tokens verified in batches.

    State: `pending`, tokens guessed and evaluated after the last picked one but not yet picked,
    and `rows`, the logits after the picked token and after each pending one (len(pending) + 1).
    """

    def __init__(self, engine, drafter, k: int = DEFAULT_DRAFT):
        from medgemma_edge.runtime.drafters import Chain

        drafter = drafter if isinstance(drafter, Chain) else Chain(drafter)  # Chain knows who guessed
        self.engine, self.drafter, self.k = engine, drafter, max(1, int(k))
        self.pending: list[int] = []
        self.rows: list[np.ndarray] = []
        self.stats = SpecStats()
        # guesses asked for next: one more than the last batch had confirmed, at most k (a drafter
        # whose guesses miss costs one row a batch, not k); a drafter with `sure = True` (text a
        # grammar forces: only its tokenization can differ) is checked whole, up to SURE_DRAFT
        self.want, self._hits, self._sure = self.k, 0, False

    @property
    def n_past(self) -> int:
        """Positions of the answer the model has confirmed (guesses not counted)."""
        return self.engine.n_past - len(self.pending)

    def logits(self) -> np.ndarray:
        return self.rows[0] if self.rows else self.engine.logits()

    def guess(self) -> int | None:
        """The guessed token at the position about to be picked, if any."""
        return self.pending[0] if self.pending else None

    def advance(self, tok: int, history: list, room: int) -> None:
        """`tok` was picked: take the logits after it from the verified rows, or evaluate it (with
        new guesses after it, at most `room` - 1 of them). `history`: the answer's context so far,
        `tok` included (what drafters read)."""
        if self.pending and tok == self.pending[0]:
            self.pending.pop(0)
            self.rows.pop(0)
            self.stats.accepted += 1
            self._hits += 1
            return
        if self.rows and not self._sure:  # a batch ends: the next asks for one guess more than it confirmed
            self.want = min(self.k, self._hits + 1)
        self.drop()
        k = min(max(self.k, SURE_DRAFT), room - 1, self.engine.n_ctx - self.engine.n_past - 1)
        # a sure drafter (forced text) is asked for all k guesses, the others for as many as `want`
        guesses = [int(t) for t in self.drafter.draft(history, k, want=self.want)][:k] if k > 0 else []
        self._sure = bool(getattr(self.drafter.source, "sure", False))
        if not guesses:
            self.engine.eval_tokens([tok])
            return
        self.engine.eval_tokens([tok, *guesses], rows=True)
        rows = self.engine.logits_rows()
        self.rows = list(rows[-len(guesses) - 1:])
        self.pending, self._hits = guesses, 0
        self.stats.batches += 1
        self.stats.drafted += len(guesses)

    def drop(self) -> None:
        """Forget unconfirmed guesses: out of the cache, and their rows."""
        if self.pending:
            self.engine.truncate(self.engine.n_past - len(self.pending))
        self.pending, self.rows = [], []


def sample_with_draft(p: np.ndarray, guess: int, rng: np.random.Generator) -> int:
    """One draw from `p` (float64, sums to 1) given a guessed token: the guess is kept with
    probability p[guess], else a draw from p without it. The guess came from a deterministic drafter
    (a point mass), so this is the standard accept/reject rule min(1, p/q) with its residual
    max(0, p - q): the result is distributed exactly as p."""
    if rng.random() < p[guess]:
        return int(guess)
    rest = p.copy()
    rest[guess] = 0.0
    total = rest.sum()
    if total <= 0:  # p was all on the guess (rounding): nothing else can be drawn
        return int(guess)
    return int(rng.choice(len(rest), p=rest / total))
