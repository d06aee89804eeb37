"""SPECULATIVE.md from benchmarks/results/speculative.json (benchmarks/bench_speculative.py)."""

from __future__ import annotations

from benchmarks.alternate import SPREAD
from medgemma_edge.runtime.speculative import SURE_DRAFT

JUMP_GOAL = 1.5  # issue 26: tokens/s of `--preset lab-report` answers on the 270M model, against plain decoding


def _ratio(p) -> str:
    if not p:
        return "–"
    return f"{p['median']:.2f}× ({SPREAD} {p['q1']:.2f}–{p['q3']:.2f}×, {p['n']} rounds)"


def _rate(alt: dict, name: str) -> str:
    v = (alt.get(name) or {}).get("median")
    return f"{v:.1f}" if v else "–"


def batch_cost(costs: dict, k: float) -> float:
    """A batch of k tokens (fractional: interpolated) in units of one token, from ms per batch size."""
    lo = max(1, min(int(k), 8))
    hi = min(lo + 1, 8)
    ms = costs[str(lo)] + (costs[str(hi)] - costs[str(lo)]) * (k - lo)
    return ms / costs["1"]


def priced(r: dict, costs: dict) -> float:
    """The answer's gain priced at a batch-cost table: its single steps at one token each, its
    batches at the cost of their mean size, against one token per token."""
    t, a, b = r["tokens"], r["accepted"], r["batches"]
    k = 1 + r["drafted"] / b if b else 1
    return t / ((t - a - b) + b * batch_cost(costs, k))


def _why(r: dict, costs: dict) -> str:
    """The reason for a gain below the goal, from the run's own numbers."""
    per_batch = r["accepted"] / r["batches"] if r["batches"] else 0
    k = 1 + r["drafted"] / r["batches"] if r["batches"] else 1
    cost = f"; a batch of {k:.1f} tokens costs {batch_cost(costs['270m'], k):.2f}× one token on this model"
    why = (f"{r['acceptance']:.0%} of {r['drafted']} guesses kept, {per_batch:.1f} tokens gained per batch{cost} "
           "(every row of a batch computes its logits over 262,144 entries")
    last = costs.get("270m_last")
    if not isinstance(last, dict) or not r["batches"]:
        return why + ")"
    return (why + f", to be checked; with the last row's logits only it costs {batch_cost(last, k):.2f}×). Priced at "
            f"these costs the answer's batches give {priced(r, costs['270m']):.2f}× checked, {priced(r, last):.2f}× "
            "unchecked — the bound for forced text that skips the check, which is not exact: the model may "
            "tokenize the forced text otherwise")


def render(d: dict) -> str:
    real, costs, proj = d["real"], d["costs"], d["projection"]
    out = ["# Speculative decoding and forced text (issue 26)", "",
           f"`{d['command'].strip()}` — {d['when']}, {d['cpu']}, CPU kind **{d['cpu_kind']}** "
           f"(SIMD {' '.join(d['flags'])}), {d['threads']} thread(s), {d['minutes']} min.", "",
           "## On real weights: Gemma 3 270M (q4_k_m), greedy", "",
           "| answer | plain (default), tok/s | plain with flash attention, tok/s | speculative, tok/s | "
           "speculative / plain | guesses kept | same tokens as plain with flash attention | default vs flash "
           "attention: first different token |", "|---|---|---|---|---|---|---|---|"]
    for name, r in real.items():
        alt = r["rates"]
        out.append(f"| {name} | {_rate(alt, 'plain')} | {_rate(alt, 'plain, flash attention')} | "
                   f"{_rate(alt, 'speculative')} | {_ratio(r['gain'])} | {r['accepted']}/{r['drafted']} "
                   f"({r['acceptance']:.0%}) in {r['batches']} batches | {'yes' if r['speculative_equals_plain_fa'] else '**no**'} | "
                   f"{'none' if r['fa_first_difference'] is None else r['fa_first_difference']} of {r['tokens']} |")
    out += ["", "Drafters: prompt lookup (n-grams of the prompt and the answer, n = 3…1); for JSON first the text "
            "the grammar forces, through optional whitespace spaced as the answer so far spaced it, checked "
            f"whole (up to {SURE_DRAFT} tokens a batch) and less its last token where a free position follows unless that "
            "token opens a value (a key's closing quote the model writes merged as `\":`); no prompt lookup in "
            "JSON (its guesses inside free values cost more rows than they saved) (runtime/drafters.py, "
            "runtime/spec_choice.py). Speculative mode runs flash attention, whose kernel gives "
            "a position the same logits alone or in a batch (the default unfused kernel does not), so its answer "
            "is checked against plain decoding with flash attention; the last column is what flash attention "
            "itself changes against the default engine.", ""]
    g = d.get("gain")
    by = (d.get("gain_by_kind") or {}).get(d["cpu_kind"]) or {}
    by = by if isinstance(by, dict) else {}
    onoff = lambda v: "on" if v and v > 1 else "off"  # noqa: E731
    out += [f"**Measured gain on this CPU kind ({d['cpu_kind']}): {g:.2f}×** on Gemma 3 270M (geometric mean of the "
            "three answers' median ratios). What `speculative=\"auto\"` reads (runtime/spec_choice.MEASURED_GAIN):", "",
            "| model | free text (prose, template) | JSON |", "|---|---|---|"]
    for size, label in (("small", "270M's size (measured)"), ("large", "4B shape (projected below)")):
        free, js = by.get(size), by.get(f"{size}_json")
        out.append(f"| {label} | {free if free else '–'}× → {onoff(free)} | {js if js else '–'}× → {onoff(js)} |")
    out.append("")
    for name, r in real.items():
        if r.get("gain") and r["gain"]["median"] < 1:
            out.append(f"- {name}: below 1 because {_why(r, costs)}.")
    js = real.get("json", {}).get("gain")
    if js:
        met = js["median"] >= JUMP_GOAL
        out += ["", f"Forced text (`--preset lab-report` JSON): {_ratio(js)} against plain decoding; goal ≥ "
                f"{JUMP_GOAL}× **{'met' if met else 'missed'}**" + ("" if met else f" — {_why(real['json'], costs)}.")]
    out += ["", "## Checking k guesses in one batch at the MedGemma-4B shape (q4_k_m, random weights)", "",
            "| tokens in the batch | 1 | 2 | 3 | 4 | 5 | 6 | 7 | 8 | Gemma 3 270M, one token |",
            "|---|---|---|---|---|---|---|---|---|---|",
            "| 4B as loaded by default: ms, median | " + " | ".join(f"{costs['ms'][str(k)]:.0f}" for k in range(1, 9)) +
            f" | {costs['ms']['270m']:.0f} |",
            "| × one token | " + " | ".join(f"{costs['ms'][str(k)] / costs['ms']['1']:.2f}" for k in range(1, 9)) +
            f" | {costs['ms']['270m'] / costs['ms']['1']:.2f} |",
            *[f"| {label}: × one token ({costs[key]['1']:.0f} ms) | " +
              " | ".join(f"{costs[key][str(k)] / costs[key]['1']:.2f}" for k in range(1, 9)) + " | |"
              for key, label in (("4b_repacked", "4B, repacked weights"), ("270m", "Gemma 3 270M"),
                                 ("270m_last", "Gemma 3 270M, the last row's logits only"))
              if isinstance(costs.get(key), dict)], "",
            "At this size two cores spend about as long computing a token as reading its weights, so a batch "
            "costs nearly a token a row unless the kernels batch well (compare the repacked row).", "",
            f"Vocabularies: {costs['vocabularies']}.", "",
            "## Projected at 4B", "",
            f"Plain decoding at the 4B shape: {proj['plain_tok_s']:.1f} tok/s (one token's cost above).", "",
            "| drafter | answer | projected tok/s | gain |", "|---|---|---|---|"]
    for name, p in proj["lookup"].items():
        out.append(f"| prompt lookup | {name} | {p['tok_s']:.1f} | {p['gain']:.2f}× |")
    for name, p in (proj.get("lookup_repacked") or {}).items():
        out.append(f"| prompt lookup, repacked weights (gain against plain repacked) | {name} | {p['tok_s']:.1f} | "
                   f"{p['gain']:.2f}× |")
    for alpha, p in proj["draft_model"].items():
        out.append(f"| Gemma 3 270M draft, k = {p['k']} | acceptance {float(alpha):.0%} (assumed) | "
                   f"{p['tok_s']:.1f} | {p['gain']:.2f}× |")
    out += ["", "Assumptions: prompt lookup — the 4B model keeps the guesses the 270M kept in the runs above "
            "(same batches, priced at the 4B batch costs); draft model — each guess kept with the stated "
            "probability independently, expected tokens per batch (1 − α^(k+1)) / (1 − α) against k draft "
            "tokens plus one batch of k + 1 rows, best k shown. MedGemma 4B's own acceptance needs its weights.", ""]
    return "\n".join(out)
