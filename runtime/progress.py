"""How far an answer is before its first token: images encoded, prompt positions evaluated.

On a CPU a long first answer spends minutes before its first token (an 85-slice CT: 85 vision
encodes, then ~22k prompt positions, benchmarks/results/REPORT.md). `Model.stream(...,
progress=True)` yields a `Progress` before the first image encode and after each one ("images"),
then before the first image block is evaluated and after each block and the text after the last
("prompt"); then the `Response`s as usual. Nothing is yielded for a stage with no work: a text-only
prompt, or images whose evaluated prefix was reused or restored from disk (runtime/prefill.py).

The time left is this stage's measured rate so far times what remains; before the first image the
machine's remembered encode speed (runtime/budget.EncodeSpeed) stands in, before the first block
nothing does (eta_s None).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

STAGES = ("images", "prompt")


@dataclass(frozen=True)
class Progress:
    stage: str  # "images": images encoded (or found in the image cache); "prompt": positions evaluated
    done: int
    total: int  # images to encode, or prompt positions to evaluate (those the cache holds not counted)
    elapsed_s: float  # since the stage began
    eta_s: float | None  # expected seconds left in this stage; None before anything measured it

    def as_dict(self) -> dict:
        return asdict(self)


class Meter:
    """One stage's clock: `at(done)` is its Progress now. per_item_s: a remembered seconds per item,
    the estimate until the first item is done (then the rate measured here replaces it)."""

    def __init__(self, stage: str, total: int, per_item_s: float | None = None):
        self.stage, self.total, self.per_item_s = stage, total, per_item_s
        self.t0 = time.perf_counter()

    def at(self, done: int) -> Progress:
        elapsed = time.perf_counter() - self.t0
        per_item = elapsed / done if done else self.per_item_s
        eta = None if per_item is None else round(per_item * (self.total - done), 2)
        return Progress(self.stage, done, self.total, round(elapsed, 3), eta)


def finished(steps):
    """Run a generator of Progress items to its end, dropping them; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value
