"""Decode overhead: our runtime vs llama-cpp-python's own `Llama`, same GGUF, same prompt, one run.

    python -m benchmarks.bench_decode [--bundle DIR] [--tokens 64] [--rounds 7]

Default bundle: the built-in demo (Gemma 3 270M q8_0). Both engines are loaded in one process and
decode greedily from the same text prompt in alternating rounds, so machine noise hits both
alike; the goal is called on the median of the per-round ratios and their spread
(benchmarks.alternate). It is the report's alternating job (benchmarks.worker.run_alternating) on
one bundle. Goal: ours ≥ 0.97 × `Llama` (benchmarks.goals.DECODE_VS_LLAMA).
"""

from __future__ import annotations

import json


def main(argv=None) -> dict:
    from benchmarks import bundles
    from benchmarks.alternate import decode_args, paired_rates
    from benchmarks.backends import Case, Spec
    from benchmarks.goals import DECODE_VS_LLAMA, paired_goal
    from benchmarks.tables import paired_ratio
    from benchmarks.worker import run_alternating
    from medgemma_edge.runtime.machine import physical_cores

    args = decode_args(__doc__.splitlines()[0], argv)
    threads = args.threads or physical_cores()
    gguf = bundles.files(args.bundle)["text"]
    specs = [Spec("llama.cpp Llama", "llama.cpp", {"text_gguf": str(gguf), "threads": threads}, image=False),
             Spec("ours", "ours", {"bundle": str(args.bundle), "threads": threads}, image=False)]
    case = Case(image="", decode_tokens=args.tokens, text_prompt_words=40, threads=threads)
    rates = run_alternating(specs, case, args.rounds)
    p = paired_rates(rates, "ours", "llama.cpp Llama")
    goal = paired_goal("decode ours / Llama", DECODE_VS_LLAMA, p)
    result = {"bundle": args.bundle.name, "gguf": gguf.name, "threads": threads, "tokens": args.tokens,
              "rounds": rates, "paired": p, "verdict": goal.verdict()}
    print(json.dumps(result, indent=2))
    print(f"decode ratio ours / Llama = {paired_ratio(p)} (goal {goal.target_text()}: {goal.verdict()})")
    return result


if __name__ == "__main__":
    main()
