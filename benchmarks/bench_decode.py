"""Decode overhead: our runtime vs llama-cpp-python's own `Llama`, same GGUF, same prompt, one run.

    python -m benchmarks.bench_decode [--bundle DIR] [--tokens 64] [--rounds 3]

Default bundle: the built-in demo (Gemma 3 270M q8_0). Both engines are loaded in one process and
decode greedily from the same text prompt in alternating rounds, so machine noise hits both
alike; the best round of each counts. It is the report's alternating job
(benchmarks.worker.run_alternating) on one bundle. Goal (runtime issue): ours ≥ 0.97 × `Llama`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> dict:
    from benchmarks import bundles
    from benchmarks.backends import Case, Spec
    from benchmarks.worker import run_alternating
    from medgemma_edge.runtime.machine import physical_cores

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.bundle is None:
        from medgemma_edge.demo import demo_bundle

        args.bundle = demo_bundle(progress=print)
    threads = args.threads or physical_cores()
    gguf = bundles.files(args.bundle)["text"]
    specs = [Spec("llama.cpp Llama", "llama.cpp", {"text_gguf": str(gguf), "threads": threads}, image=False),
             Spec("ours", "ours", {"bundle": str(args.bundle), "threads": threads}, image=False)]
    case = Case(image="", decode_tokens=args.tokens, text_prompt_words=40, threads=threads)
    rates = run_alternating(specs, case, args.rounds)
    ours, theirs = rates["ours"]["best"], rates["llama.cpp Llama"]["best"]
    result = {"bundle": str(args.bundle), "gguf": gguf.name, "threads": threads, "tokens": args.tokens,
              "llama_tok_s": theirs, "ours_tok_s": ours, "ratio": ours / theirs, "rounds": rates}
    print(json.dumps(result, indent=2))
    print(f"decode ratio ours / Llama = {result['ratio']:.3f} (goal ≥ 0.97)")
    return result


if __name__ == "__main__":
    main()
