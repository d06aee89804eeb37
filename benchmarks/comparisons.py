"""Comparisons without a goal (the report's "Other comparisons"), from one run's results: each row
(what, ours, anchor, ours' advantage as a factor: > 1 = ours better)."""

from __future__ import annotations

from benchmarks.alternate import paired_rates
from benchmarks.goals import _get, _ratio, busy_ratio, median_rate
from benchmarks.tables import GB, MIB, paired_ratio


def _best_ms(prep: dict, name: str | None, kind: str):
    return (((prep.get(name or "") or {}).get(kind)) or {}).get("best_ms")


def context_ratios(data: dict) -> list[tuple[str, str, str, str]]:
    results, names, prep, roof = data["results"], data["names"], data.get("preprocess") or {}, data["roofline"]
    ours, llama, hf, hf_text = names["ours"], names["llama"], names["hf"], names.get("hf_text")
    rows = []

    def add(what, mine, theirs, unit, higher_is_better, factor_text=None, digits=2):
        if mine is None or theirs is None:
            return
        factor = _ratio(mine, theirs) if higher_is_better else _ratio(theirs, mine)
        shown = factor_text or ("—" if factor is None else f"{factor:.2f}×")
        rows.append((what, f"{mine:.{digits}f} {unit}", f"{theirs:.{digits}f} {unit}", shown))

    first = lambda name, key: _get(results, name, "first", key)  # noqa: E731
    add("TTFT, first question, vs llama.cpp direct", first(ours, "ttft_s"), first(llama, "ttft_s"), "s", False)
    add("TTFT, first question, vs transformers fp32", first(ours, "ttft_s"), first(hf, "ttft_s"), "s", False)
    add("TTFT, first question about a pre-encoded study vs cold first question",
        first(names.get("prepared"), "ttft_s"), first(ours, "ttft_s"), "s", False)
    add("TTFT, follow-up, vs llama.cpp direct (its handler re-encodes)", _get(results, ours, "follow_up", "ttft_s"),
        _get(results, llama, "follow_up", "ttft_s"), "s", False)
    add("decode vs llama.cpp direct, image prompt, each in its own process",
        first(ours, "decode_tok_s"), first(llama, "decode_tok_s"), "tok/s", True)
    add("prefill vs llama.cpp direct", first(ours, "prefill_tok_s"), first(llama, "prefill_tok_s"), "tok/s", True)
    add("prefill vs transformers fp32", first(ours, "prefill_tok_s"), first(hf, "prefill_tok_s"), "tok/s", True)
    hf_decode = max([v for v in (first(hf, "decode_tok_s"), _get(results, hf_text, "text", "decode_tok_s")) if v],
                    default=None)
    add("decode vs transformers (faster of fp32 / bf16)", first(ours, "decode_tok_s"), hf_decode, "tok/s", True)
    for name in names.get("ours_paths", []):
        if name != ours and first(name, "image_encode_s"):
            add(f"image encode: vision {_get(results, name, 'vision')} vs transformers fp32",
                first(name, "image_encode_s"), first(hf, "image_encode_s"), "s", False)
    add("TTFT, follow-up on the same image vs first question", _get(results, ours, "follow_up", "ttft_s"),
        first(ours, "ttft_s"), "s", False)
    alt = (data.get("alternating") or {}).get("q4_k_m") or {}
    repacked = names.get("repacked")
    p = paired_rates(alt, repacked, "ours q4_k_m")
    add("decode q4_k_m: repacked weights (--repack-weights) vs default, alternating rounds, medians",
        median_rate(alt, repacked), median_rate(alt, "ours q4_k_m"), "tok/s", True, p and paired_ratio(p))
    mem = [_get(results, n, "peak_rss_mb") for n in (repacked, names.get("text_q4"))]
    if all(mem):
        rows.append(("peak RSS, text only: repacked weights vs default (memory cost)", f"{mem[0] * MIB / GB:.2f} GB",
                     f"{mem[1] * MIB / GB:.2f} GB", f"+{(mem[0] - mem[1]) * MIB / GB:.2f} GB"))
    rates = (data.get("busy") or {}).get("rates") or {}
    _, p = busy_ratio(data.get("busy"), "busy, runtime's choice", "busy, all threads")
    add("decode beside one busy process: runtime's choice vs all threads", rates.get("busy, runtime's choice"),
        rates.get("busy, all threads"), "tok/s", True, p and paired_ratio(p))
    add("decode q4_k_m vs bandwidth roofline ceiling (ours / ceiling)", median_rate(alt, "ours q4_k_m"),
        roof.get("decode_ceiling_tok_s"), "tok/s", True)
    add("image encode vs roofline floor (floor / ours)", first(ours, "image_encode_s"), roof.get("encode_floor_s"),
        "s", False)
    add("preprocessing PNG vs llama.cpp's own (decode + resize + normalize)", _best_ms(prep, ours, "png"),
        _best_ms(prep, llama, "png"), "ms", False)
    for kind in ("png", "dicom16", "ct_series"):
        add(f"preprocessing {kind}: ours vs the file decode alone (floor / ours)", _best_ms(prep, ours, kind),
            _best_ms(prep, names.get("floor"), kind), "ms", False, digits=1)
    for kind in ("png", "dicom16", "ct_series"):
        floor, hf_ms = _best_ms(prep, names.get("floor"), kind), _best_ms(prep, hf, kind)
        if floor and hf_ms:
            rows.append((f"preprocessing {kind}: best reachable vs HF (HF / file decode alone)",
                         f"{floor:.1f} ms decode", f"{hf_ms:.1f} ms", f"{hf_ms / floor:.2f}× at most"))
    add("load vs llama.cpp direct", _get(results, ours, "load_s"), _get(results, llama, "load_s"), "s", False)
    rss = [_get(results, n, "peak_rss_mb") for n in (ours, llama)]
    add("peak RSS vs llama.cpp direct (one image)", *(None if v is None else v * MIB / GB for v in rss), "GB", False)
    return rows
