"""The repetition guard: stop an answer that has fallen into a loop of tokens.

MedGemma at greedy can loop (repeated newlines, a phrase or a sentence over and over: reported
against vLLM and llama.cpp; the 270M test model does it on many prompts). Once an answer repeats
itself back to back, greedy decoding sees the same context again and again and goes on until the
token limit, so the guard stops it there with finish_reason "repetition".

The rule, on the answer's tokens only (never the prompt's): the answer stops at the first token
after which its last S tokens repeat one cycle of P tokens back to back (each of them equals the
token P before it), for some period P in 1..MAX_PERIOD, where

    S = max(MIN_SPAN, MIN_REPEATS * P)

So one token 32 times in a row (P = 1: a run of newlines), a 2-token cycle 16 times, a 4-token
cycle 8 times, an 8-token cycle 4 times, and a cycle of 11 to 64 tokens (a phrase, a sentence)
3 times. Text whose structure repeats but whose values change (a numbered list, a table, JSON
entries) never fires: one different token in each turn of the cycle starts the count again. A
cycle longer than MAX_PERIOD tokens is not seen; nor is any answer shorter than MIN_SPAN tokens.

Cost: O(MAX_PERIOD) integer comparisons per token (one run length per period, kept up to date,
the last MAX_PERIOD tokens kept): small beside one decode step of any model.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

MAX_PERIOD = 64  # longest cycle seen, in tokens (a sentence); longer loops run to the token limit
MIN_SPAN = 32  # fewest repeating tokens that stop an answer, whatever the period
MIN_REPEATS = 3  # fewest turns of a long cycle (a sentence said three times over)


@dataclass(frozen=True)
class Loop:
    """The loop that stopped an answer: its `period` and the answer's last `tokens` that repeat it."""
    period: int
    tokens: int


class RepetitionGuard:
    """Fed an answer's tokens one by one (`push`); says the `Loop` once the rule above holds."""

    def __init__(self, max_period: int = MAX_PERIOD, min_span: int = MIN_SPAN, min_repeats: int = MIN_REPEATS):
        self.recent = deque(maxlen=max_period)  # the latest tokens, newest last
        # runs[p]: how many of the latest tokens in a row each equal the token p before it
        self.runs = [0] * (max_period + 1)
        # a run of `need[p]` such tokens makes S = max(min_span, min_repeats * p) periodic tokens
        self.need = [0] + [max(min_span, min_repeats * p) - p for p in range(1, max_period + 1)]

    def push(self, token: int) -> Loop | None:
        """Take the answer's next token; the loop its last tokens now repeat (shortest period), or None."""
        found = None
        for p, back in enumerate(reversed(self.recent), 1):  # back: the token p before this one
            run = self.runs[p] = self.runs[p] + 1 if back == token else 0
            if found is None and run >= self.need[p]:
                found = Loop(p, run + p)
        self.recent.append(token)
        return found


def first_loop(tokens) -> tuple[int, Loop] | None:
    """(how many of `tokens` an answer keeps before the guard stops it, the loop), or None if it never does."""
    guard = RepetitionGuard()
    for n, tok in enumerate(tokens, 1):
        loop = guard.push(tok)
        if loop is not None:
            return n, loop
    return None
