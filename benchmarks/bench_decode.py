"""Decode overhead: our runtime vs llama-cpp-python's own `Llama`, same GGUF, same prompt, one run.

    python -m benchmarks.bench_decode [--bundle DIR] [--tokens 64] [--rounds 3]

Default bundle: the built-in demo (Gemma 3 270M q8_0). Both sides decode greedily from the same
prompt tokens; rounds alternate so machine noise hits both alike; the best round of each counts.
Goal (runtime issue): ours ≥ 0.97 × `Llama`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

PROMPT = ("Write a detailed, step by step explanation of how a chest radiograph is read, "
          "covering airway, breathing, cardiac silhouette, diaphragm and everything else.")


def _ours(bundle: Path, tokens: int, threads: int) -> float:
    import runtime

    model = runtime.load(bundle, threads=threads)
    reply = model.chat([{"role": "user", "content": PROMPT}], max_new_tokens=tokens)
    _ours.n = reply.completion_tokens
    return reply.stats["decode_tok_s"]


def _llama(gguf: Path, prompt_ids: list[int], tokens: int, threads: int) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf), n_ctx=4096, n_batch=512, n_threads=threads, verbose=False)
    times = []
    for _ in llm.create_completion(prompt_ids, max_tokens=tokens, temperature=0.0, stream=True):
        times.append(time.perf_counter())
    _llama.n = len(times)
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    from runtime.backends.llama_engine import physical_cores
    from runtime.chat import render_prompt
    from runtime.manifest import read_manifest

    if args.bundle is None:
        from runtime.demo import demo_bundle

        args.bundle = demo_bundle(progress=print)
    threads = args.threads or physical_cores()
    manifest = read_manifest(args.bundle)
    gguf = args.bundle / next(f["path"] for f in manifest["files"] if f["role"] == "text")
    import llama_cpp

    vocab_only = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    prompt_ids = vocab_only.tokenize(render_prompt([{"role": "user", "content": PROMPT}]).encode(),
                                     add_bos=False, special=True)
    ours, theirs = [], []
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}: llama-cpp-python Llama ...", flush=True)
        theirs.append(_llama(gguf, prompt_ids, args.tokens, threads))
        print(f"round {r + 1}/{args.rounds}: medgemma-edge runtime ...", flush=True)
        ours.append(_ours(args.bundle, args.tokens, threads))
        print(f"  Llama {theirs[-1]:.2f} tok/s ({_llama.n} tokens), ours {ours[-1]:.2f} tok/s ({_ours.n} tokens)")
    result = {"bundle": str(args.bundle), "gguf": gguf.name, "threads": threads, "tokens": args.tokens,
              "llama_tok_s": max(theirs), "ours_tok_s": max(ours), "ratio": max(ours) / max(theirs),
              "rounds": {"llama": theirs, "ours": ours}}
    print(json.dumps(result, indent=2))
    print(f"decode ratio ours / Llama = {result['ratio']:.3f} (goal ≥ 0.97)")
    return result


if __name__ == "__main__":
    main()
