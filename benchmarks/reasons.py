"""For each missed goal, the measured reason: numbers from the same run that say where the time or
the memory went (the report's "Why goals were missed" section).
"""

from __future__ import annotations

from benchmarks.goals import GB, MIB, Goal, _get


def _s(v, unit="s", digits=2) -> str:
    return "?" if v is None else f"{v:.{digits}f} {unit}"


def missed(goals: list[Goal], data: dict) -> list[str]:
    res, names, prep = data["results"], data["names"], data.get("preprocess") or {}
    ours, llama, hf = names["ours"], names["llama"], names["hf"]
    roof = data.get("roofline") or {}
    first = lambda name, key: _get(res, name, "first", key)  # noqa: E731
    lines = []
    for g in goals:
        if g.met is not False:
            continue
        why = None
        if g.name.startswith("decode vs llama.cpp direct"):
            quant = g.name.rsplit("(", 1)[-1].rstrip(")")
            alt = (data.get("alternating") or {}).get(quant) or {}
            rep = (alt.get(names.get("repacked", "")) or {}).get("best")
            them = (alt.get(f"llama.cpp {quant}") or {}).get("best")
            mem = [_get(res, n, "peak_rss_mb") for n in (names.get("repacked"), names.get("text_q4"))]
            why = ("llama-cpp-python's `Llama` keeps a second copy of the weights repacked for this CPU's "
                   "kernels (llama.cpp's extra buffer types); our engine leaves it off by default")
            if rep and them:
                why += f"; with `--repack-weights` ours decodes {rep:.2f} tok/s = {rep / them:.2f}× llama.cpp"
            if all(mem):
                why += (f", at {mem[0] * MIB / GB:.2f} GB vs {mem[1] * MIB / GB:.2f} GB text-only peak RSS "
                        f"(+{(mem[0] - mem[1]) * MIB / GB:.2f} GB): with an image that passes the 4.5 GB "
                        "bound, so memory wins by default")
        elif g.name.startswith("preprocessing"):
            kind = g.name.split()[1]
            mine = ((prep.get(ours) or {}).get(kind) or {}).get("best_ms")
            base = ((prep.get(names.get("floor", "")) or {}).get(kind) or {}).get("best_ms")
            if mine and base:
                why = (f"the file decode alone takes {base:.1f} ms; ours adds {mine - base:.1f} ms to window, "
                       "resize to 896² with a pad and convert (the resize of a 2500×2048 picture alone measured "
                       "~12 ms on 2 threads with `python -m benchmarks.bench_preprocess`, more than half a fast "
                       "decode; a CT series windows and resizes every slice)")
        elif g.name.startswith(("TTFT, cold", "image encode")):
            enc, ttft = first(ours, "image_encode_s"), first(ours, "ttft_s")
            why = (f"image encode {_s(enc)} of the {_s(ttft)} cold TTFT (prefill {_s(first(ours, 'prefill_tok_s'), 'tok/s', 1)}); "
                   f"the GEMM roofline puts the f32 encoder at {_s(roof.get('encode_floor_s'))}; "
                   f"anchors: llama.cpp encode {_s(first(llama, 'image_encode_s'))}, "
                   f"transformers fp32 {_s(first(hf, 'image_encode_s'))}")
        elif g.name.startswith("peak RSS"):
            why = "by path: " + g.anchor
        elif g.name.startswith("load"):
            why = (f"text model {_s(_get(res, ours, 'load_text_s'))} of {_s(_get(res, ours, 'load_s'))} "
                   f"(the rest opens the vision file {_get(res, ours, 'vision') or ''})")
        elif g.name.startswith("decode with one competing"):
            rates = (data.get("busy") or {}).get("rates") or {}
            why = ", ".join(f"{k} {v:.2f} tok/s" for k, v in rates.items())
        elif "pre-encoded" in g.name:
            name = names.get("prepared")
            reused, total, rate = (first(name, k) for k in ("reused_tokens", "prompt_tokens", "prefill_tok_s"))
            why = f"restored {reused} of {total} prompt positions, image encode {_s(first(name, 'image_encode_s'))}"
            if reused is not None and total and rate:
                left = total - reused
                why += (f"; what is left is the question itself: {left} tokens of prefill at {rate:.1f} tok/s = "
                        f"{left / rate:.2f} s of the {_s(first(name, 'ttft_s'))}, while the cold first question "
                        f"got faster ({_s(first(ours, 'ttft_s'))}, its encode on the fastest faithful path)")
        lines.append(f"- **{g.name}** ({g.verdict()}): {why or 'measured: ' + g.ours + ' vs ' + (g.anchor or '—')}.")
    return lines
