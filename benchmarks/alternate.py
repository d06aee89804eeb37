"""Decode comparisons in alternating rounds, and the paired statistics every decode goal is called on.

Load on a machine drifts within minutes, so two engines timed one after the other are timed on
different machines. Here each round runs every engine once, back to back; a round's ratio
(ours / theirs) compares two runs that shared the machine's state, and the goal is decided on the
median of those per-round ratios with its spread, the interquartile range (the middle half of the
rounds: one round hit by a stray job moves neither end), not on a best or a single run.

    MIN_ROUNDS, MIN_TOKENS   what a decode comparison needs to be called at all (issue 21)
    alternate(runs, rounds)  name -> {"best", "median", "rounds": [tok/s per round]}
    paired(ours, theirs)     per-round ratios -> median, q1, q3, min, max, n
"""

from __future__ import annotations

import statistics
from typing import Callable

from benchmarks.backends import say

MIN_ROUNDS = 7  # fewer: the quartiles of the per-round ratios rest on one or two rounds each
MIN_TOKENS = 64  # fewer: a round's rate is dominated by the first tokens' timer granularity and warm-up
SPREAD = "IQR"  # how reports name the spread of the per-round ratios (interquartile range)


def decode_args(description: str, argv=None):
    """The command line of a decode comparison on one bundle (--bundle, default: the demo bundle,
    made on first use; --tokens, --rounds, --threads)."""
    import argparse
    from pathlib import Path

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=MIN_TOKENS)
    ap.add_argument("--rounds", type=int, default=MIN_ROUNDS)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.bundle is None:
        from medgemma_edge.demo import demo_bundle

        args.bundle = demo_bundle(progress=print)
    return args


def alternate(runs: dict[str, Callable[[], float | None]], rounds: int, label: str = "alternating") -> dict:
    """Call every run once to warm it up (first-call allocations, page faults on the weights), then
    `rounds` times each in turn; each run returns its decode tok/s (None: nothing decoded)."""
    for fn in runs.values():
        fn()
    rates: dict[str, list] = {name: [] for name in runs}
    for r in range(rounds):
        for name, fn in runs.items():
            rates[name].append(fn())
        say(f"  [{label}] round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]}" for k, v in rates.items()))
    return {name: summary(v) for name, v in rates.items()}


def summary(rates: list) -> dict:
    """{"best", "median", "rounds"} of one engine's per-round rates (None rounds kept in `rounds`)."""
    seen = [v for v in rates if v]
    return {"best": max(seen, default=None), "median": statistics.median(seen) if seen else None,
            "rounds": list(rates)}


def paired(ours: list | None, theirs: list | None) -> dict | None:
    """Per-round ratios ours / theirs (rounds where either decoded nothing are left out) and their
    median, quartiles (inclusive method: q1 = q3 = the value for one round) and extremes; None when
    no round has both."""
    ratios = [o / t for o, t in zip(ours or (), theirs or ()) if o and t]
    if not ratios:
        return None
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return {"median": statistics.median(ratios), "q1": q1, "q3": q3, "min": min(ratios), "max": max(ratios),
            "n": len(ratios), "ratios": [round(r, 4) for r in ratios]}


def paired_rates(pair: dict, ours: str, theirs: str) -> dict | None:
    """paired() of two engines' rounds inside one `alternate` result."""
    return paired((pair.get(ours) or {}).get("rounds"), (pair.get(theirs) or {}).get("rounds"))
