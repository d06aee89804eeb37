"""Decode on a busy machine: quiet vs beside one competing busy process, all threads vs the
runtime's own choice (runtime/machine.py OthersLoad + threads_beside), one model, one run.

    python -m benchmarks.bench_busy [--bundle DIR] [--tokens 64] [--rounds 7] [--threads N]

Default bundle: the built-in demo (Gemma 3 270M q8_0). Goal (issue 14): with one busy process,
decode ≥ 50 % of the quiet-machine rate; quiet speed unchanged. The four conditions alternate
within each round (benchmarks.alternate), the busy process spinning only while a busy condition
decodes; the goal is called on the per-round busy / quiet ratios.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from benchmarks.alternate import MIN_ROUNDS, MIN_TOKENS, alternate, decode_args, paired
from benchmarks.goals import BUSY_OVER_QUIET, paired_goal
from benchmarks.tables import num, paired_ratio

PROMPT = [{"role": "user", "content": "Write a long paragraph about the history of radiology."}]
CONDITIONS = (("quiet, all threads", False, False), ("quiet, runtime's choice", False, True),
              ("busy, all threads", True, False), ("busy, runtime's choice", True, True))  # (name, busy, adaptive)
SETTLE_S = 1.0  # the runtime's OthersLoad needs a window of the busy process's CPU use to see it


def _decode(model, model_mod, adaptive: bool, tokens: int, busy: bool):
    """One decode in one condition: the runtime's thread choice or all threads, beside a process
    spinning on a core or not."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    real = model_mod.threads_beside
    model_mod.threads_beside = real if adaptive else (lambda others, wanted: wanted)
    try:
        if spinner:
            time.sleep(SETTLE_S)
        model.engine.reset()
        return model.chat(PROMPT, max_new_tokens=tokens, repetition_guard=False).stats.decode_tok_s  # all `tokens`
    finally:
        model_mod.threads_beside = real
        if spinner:
            spinner.kill()
            spinner.wait()


def measure(model, tokens: int = MIN_TOKENS, rounds: int = MIN_ROUNDS) -> dict:
    """{"rates": condition -> median tok/s, "rounds": condition -> tok/s per round} of `model` in
    the four conditions (quiet / one busy process, all threads / the runtime's choice)."""
    from medgemma_edge.runtime import model as model_mod

    runs = {name: (lambda busy=busy, adaptive=adaptive: _decode(model, model_mod, adaptive, tokens, busy))
            for name, busy, adaptive in CONDITIONS}
    rates = alternate(runs, rounds, "busy machine")
    return {"rates": {k: v["median"] for k, v in rates.items()}, "rounds": {k: v["rounds"] for k, v in rates.items()}}


def main(argv=None) -> dict:
    import medgemma_edge
    from medgemma_edge.runtime.vision_choice import cpu_flags

    args = decode_args(__doc__.splitlines()[0], argv)
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx2", "avx512f", "avx512_vnni", "avx512_bf16")))
    model = medgemma_edge.load(args.bundle, threads=args.threads, context=1024)
    res = measure(model, args.tokens, args.rounds)
    print(f"{args.bundle.name}, {model.threads} threads, CPU flags {' '.join(flags) or 'unknown'}")
    for name, rate in res["rates"].items():
        print(f"  {name:24s} {num(rate, 'tok/s')} (median of {args.rounds} rounds)")
    for threads in ("all threads", "runtime's choice"):
        p = paired(res["rounds"][f"busy, {threads}"], res["rounds"][f"quiet, {threads}"])
        goal = paired_goal("busy / quiet", BUSY_OVER_QUIET, p) if threads != "all threads" else None
        print(f"  busy / quiet, {threads}: {paired_ratio(p)}" + (f" — goal {goal.target_text()}: {goal.verdict()}"
                                                                  if goal else ""))
    return {**res, "cpu_flags": flags}

if __name__ == "__main__":
    print(json.dumps(main()["rates"]))
