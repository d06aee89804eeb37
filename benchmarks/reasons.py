"""For each goal missed or within noise, what the same run measured about it (the report's "Why"
section). Every number here is read from the run's data and every conclusion is computed from it
(a bound compared, a difference taken); what the run did not measure is not said.
"""

from __future__ import annotations

from benchmarks.alternate import paired, paired_rates
from benchmarks.goals import MISSED, NOISE, Goal, _get, median_rate
from benchmarks.tables import GB, MIB, num, paired_ratio


def _rounds(ratios) -> str:
    return ", ".join(f"{r:.2f}" for r in ratios)


def _decode(g: Goal, data: dict, rss_goal: Goal | None) -> str:
    names, res = data["names"], data["results"]
    quant = g.name.rsplit("(", 1)[-1].rstrip(")")
    alt = (data.get("alternating") or {}).get(quant) or {}
    ours, theirs = f"ours {quant}", f"llama.cpp {quant}"
    p = paired_rates(alt, ours, theirs)
    why = f"per-round ours / llama.cpp: {_rounds(p['ratios'])}" if p else "no paired rounds"
    repacked = names.get("repacked", "")
    if repacked not in alt:
        return why
    rep = paired_rates(alt, repacked, theirs)
    why += (f"; ours loads without llama.cpp's repacked weights unless `--repack-weights`: with them, in the same "
            f"rounds, {num(median_rate(alt, repacked), 'tok/s')} = {paired_ratio(rep)} llama.cpp")
    mem = [_get(res, n, "peak_rss_mb") for n in (repacked, names.get("text_q4"))]
    image_rss = _get(res, names["ours"], "peak_rss_mb")
    if all(mem):
        extra = (mem[0] - mem[1]) * MIB / GB
        why += f", for {extra:+.2f} GB of text-only peak RSS"
        if image_rss and rss_goal is not None:
            total = image_rss * MIB / GB + extra
            side = "above" if total > rss_goal.target else "within"
            why += (f"; added to the default path's one-image peak RSS ({image_rss * MIB / GB:.2f} GB) that makes "
                    f"{total:.2f} GB, {side} the {rss_goal.target:g} GB bound")
    return why


def _ttft_prepared(data: dict) -> str:
    name, res = data["names"].get("prepared"), data["results"]
    reused, total, rate, ttft = (_get(res, name, "first", k) for k in ("reused_tokens", "prompt_tokens",
                                                                          "prefill_tok_s", "ttft_s"))
    encode = num(_get(res, name, "first", "image_encode_s"), "s")
    why = f"restored {reused} of {total} prompt positions, image encode {encode}"
    if reused is not None and total and rate:
        left = total - reused
        why += (f"; the {left} positions left took {left / rate:.2f} s of prefill at {rate:.1f} tok/s, "
                f"of the {num(ttft, 's')}")
    return why


def _cold(data: dict) -> str:
    res, names, roof = data["results"], data["names"], data.get("roofline") or {}
    first = lambda name, key: _get(res, name, "first", key)  # noqa: E731
    ours = names["ours"]
    return (f"image encode {num(first(ours, 'image_encode_s'), 's')} of the {num(first(ours, 'ttft_s'), 's')} cold "
            f"TTFT (prefill {num(first(ours, 'prefill_tok_s'), 'tok/s', 1)}); the GEMM roofline puts the f32 encoder "
            f"at {num(roof.get('encode_floor_s'), 's')}; anchors: llama.cpp encode "
            f"{num(first(names['llama'], 'image_encode_s'), 's')}, transformers fp32 "
            f"{num(first(names['hf'], 'image_encode_s'), 's')}")


def _load(data: dict) -> str:
    res, ours = data["results"], data["names"]["ours"]
    total, text = _get(res, ours, "load_s"), _get(res, ours, "load_text_s")
    why = f"text model {num(text, 's')} of {num(total, 's')}"
    if total is not None and text is not None:
        why += f"; {total - text:.2f} s opening the vision file ({_get(res, ours, 'vision') or '?'})"
    return why


def _busy(data: dict) -> str:
    busy = data.get("busy") or {}
    why = ", ".join(f"{k} {v:.2f} tok/s" for k, v in (busy.get("rates") or {}).items())
    rounds = busy.get("rounds") or {}
    if rounds:
        p = paired(rounds.get("busy, runtime's choice"), rounds.get("quiet, runtime's choice"))
        if p:
            why += f"; per-round busy / quiet: {_rounds(p['ratios'])}"
    return why


def missed(goals: list[Goal], data: dict) -> list[str]:
    """One line per goal missed or within noise: its verdict and what the run measured about it."""
    rss_goal = next((g for g in goals if g.name.startswith("peak RSS")), None)
    lines = []
    for g in goals:
        if g.status not in (MISSED, NOISE):
            continue
        why = None
        if g.name.startswith("decode vs llama.cpp direct"):
            why = _decode(g, data, rss_goal)
        elif g.name.startswith("TTFT, first question about a pre-encoded study"):
            why = _ttft_prepared(data)
        elif g.name.startswith(("TTFT, cold", "image encode")):
            why = _cold(data)
        elif g.name.startswith("peak RSS"):
            why = f"by path: {g.anchor} GB"
        elif g.name.startswith("load"):
            why = _load(data)
        elif g.name.startswith("decode with one competing"):
            why = _busy(data)
        lines.append(f"- **{g.name}** ({g.verdict()}): {why or 'measured: ' + g.ours + ' vs ' + (g.anchor or '—')}.")
    return lines
