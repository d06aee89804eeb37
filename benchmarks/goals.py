"""Issue 14's goals as data, and the ratios that decide them, computed from one run's results.

Each ratio is measured against an anchor from the same run on the same machine (STYLE.md, habit 6).
A goal is either `at_least` a ratio (higher is better) or `at_most` a limit (lower is better);
`verdict` says met, or missed and by how much.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
MIB = 1 << 20


@dataclass
class Goal:
    name: str
    target: float
    mode: str  # "at_least" | "at_most"
    unit: str = "x"  # "x" for a ratio, "s" or "GB" for a limit
    value: float | None = None
    ours: str = ""  # what was measured, in words with units
    anchor: str = ""
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.target if self.mode == "at_least" else self.value <= self.target

    def score(self) -> float | None:
        """value / target for at_least, target / value for at_most: >= 1 means met."""
        if self.value is None or self.value == 0:
            return None
        return self.value / self.target if self.mode == "at_least" else self.target / self.value

    def verdict(self) -> str:
        if self.value is None:
            return "not measured" + (f" ({self.note})" if self.note else "")
        if self.met:
            return "met"
        if self.mode == "at_least":
            short = 1 - self.value / self.target
            return f"missed: {self.value:.2f}{self.unit} of {self.target:g}{self.unit} ({short:.0%} short)"
        return f"missed: {self.value:.2f} {self.unit} vs ≤ {self.target:g} ({self.value / self.target - 1:.0%} over)"


def _get(results: dict, name: str, *path):
    node = results.get(name) or {}
    for key in path:
        node = (node or {}).get(key) if isinstance(node, dict) else None
    return node


def _ratio(num, den):
    return None if not num or not den else num / den


def _fmt(v, unit: str, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f} {unit}"


def evaluate(results: dict, prep: dict, roof: dict, names: dict, alternating: dict | None = None,
             busy: dict | None = None, flags=()) -> list[Goal]:
    """Issue 14's goals. results: spec name -> model-phase result; prep: spec name -> {kind: timing};
    names: role -> spec name ('ours' = the default bundle with vision auto, 'prepared', 'llama',
    'hf', 'floor', 'hf_text') and 'ours_paths' (every default vision path); alternating: quant ->
    spec name -> decode rates from alternating rounds; busy: benchmarks.bench_busy's rates;
    flags: the CPU's flags (the encode goal against transformers depends on VNNI)."""
    ours, llama, hf = names["ours"], names["llama"], names["hf"]
    first = lambda name, key: _get(results, name, "first", key)  # noqa: E731
    goals = []

    t_cold, t_prep = first(ours, "ttft_s"), first(names.get("prepared"), "ttft_s")
    goals.append(Goal("TTFT, first question about a pre-encoded study, new process", 3.0, "at_most", unit="s",
                      value=t_prep, ours=_fmt(t_prep, "s"), anchor=_fmt(t_cold, "s cold")))
    goals.append(Goal("TTFT, pre-encoded study vs cold first question", 20.0, "at_least",
                      value=_ratio(t_cold, t_prep), ours=_fmt(t_prep, "s"), anchor=_fmt(t_cold, "s cold")))
    vision = _get(results, ours, "vision") or "?"
    for who, name, target in (("llama.cpp direct", llama, 3.0), ("transformers fp32", hf, 1.5)):
        theirs = first(name, "ttft_s")
        goals.append(Goal(f"TTFT, cold first question ({vision}) vs {who}", target, "at_least",
                          value=_ratio(theirs, t_cold), ours=_fmt(t_cold, "s"), anchor=_fmt(theirs, "s")))
    e_ours = first(ours, "image_encode_s")
    vnni = bool(set(flags) & {"avx512_vnni", "avx_vnni", "amx_int8"})
    for who, name, target in (("llama.cpp's own path", llama, 2.0),
                              ("transformers fp32", hf, 2.0 if vnni else 1.3)):
        theirs = first(name, "image_encode_s")
        goals.append(Goal(f"image encode, fastest faithful path ({vision}) vs {who}", target, "at_least",
                          value=_ratio(theirs, e_ours), ours=_fmt(e_ours, "s"), anchor=_fmt(theirs, "s"),
                          note="" if theirs else f"{name} did not run"))

    for quant, pair in (alternating or {}).items():
        if not pair:
            continue
        a, b = (pair.get(f"{who} {quant}", {}).get("best") for who in ("ours", "llama.cpp"))
        rounds = len(pair.get(f"ours {quant}", {}).get("rounds") or ())
        goals.append(Goal(f"decode vs llama.cpp direct, same file ({quant})", 0.97, "at_least",
                          value=_ratio(a, b), ours=_fmt(a, "tok/s"), anchor=_fmt(b, "tok/s"),
                          note=f"text prompt, best of {rounds} alternating rounds in one process"))
    rates = (busy or {}).get("rates") or {}
    b, q = rates.get("busy, runtime's choice"), rates.get("quiet, runtime's choice")
    goals.append(Goal("decode with one competing busy process / quiet", 0.5, "at_least", value=_ratio(b, q),
                      ours=_fmt(b, "tok/s busy"), anchor=_fmt(q, "tok/s quiet")))

    floor = prep.get(names.get("floor", "")) or {}
    for kind, target in (("png", 1.5), ("dicom16", 1.5), ("ct_series", 3.0)):
        mine = ((prep.get(ours) or {}).get(kind) or {}).get("best_ms")
        base = (floor.get(kind) or {}).get("best_ms")
        goals.append(Goal(f"preprocessing {kind} / file-decode floor", target, "at_most", unit="x",
                          value=_ratio(mine, base), ours=_fmt(mine, "ms", 1), anchor=_fmt(base, "ms floor", 1)))

    paths = [n for n in names.get("ours_paths", [ours]) if _get(results, n, "peak_rss_mb")]
    rss = {n: _get(results, n, "peak_rss_mb") * MIB / GB for n in paths}
    worst = max(rss, key=rss.get) if rss else None
    goals.append(Goal("peak RSS, every default path, one image", 4.5, "at_most", unit="GB",
                      value=rss.get(worst), ours=_fmt(rss.get(worst), f"GB ({_get(results, worst, 'vision')})"),
                      anchor=", ".join(f"{_get(results, n, 'vision')} {v:.2f}" for n, v in rss.items())))
    load = _get(results, ours, "load_s")
    goals.append(Goal("load, warm page cache, bundle -> ready for an image question", 3.0, "at_most", unit="s",
                      value=load, ours=_fmt(load, "s"), anchor=_fmt(_get(results, llama, "load_s"), "s llama.cpp")))
    return goals


def context_ratios(results: dict, prep: dict, roof: dict, names: dict, alternating: dict | None = None,
                   busy: dict | None = None) -> list[tuple[str, str, str, str]]:
    """Further comparisons without a goal: (what, ours, anchor, ours' advantage as a factor > 1 = better)."""
    ours, llama, hf, hf_text = names["ours"], names["llama"], names["hf"], names.get("hf_text")
    rows = []

    def add(what, mine, theirs, unit, higher_is_better):
        if mine is None or theirs is None:
            return
        factor = _ratio(mine, theirs) if higher_is_better else _ratio(theirs, mine)
        shown = "—" if factor is None else f"{factor:.2f}×"
        rows.append((what, f"{mine:.2f} {unit}", f"{theirs:.2f} {unit}", shown))

    first = lambda name, key: _get(results, name, "first", key)  # noqa: E731
    add("TTFT, first question, vs llama.cpp direct", first(ours, "ttft_s"), first(llama, "ttft_s"), "s", False)
    add("TTFT, first question, vs transformers fp32", first(ours, "ttft_s"), first(hf, "ttft_s"), "s", False)
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
    alt = (alternating or {}).get("q4_k_m") or {}
    rep, plain = (alt.get(n, {}).get("best") for n in (names.get("repacked"), "ours q4_k_m"))
    add("decode q4_k_m: repacked weights (--repack-weights) vs default, alternating rounds", rep, plain,
        "tok/s", True)
    mem = [_get(results, n, "peak_rss_mb") for n in (names.get("repacked"), names.get("text_q4"))]
    if all(mem):
        rows.append(("peak RSS, text only: repacked weights vs default (memory cost)", f"{mem[0] * MIB / GB:.2f} GB",
                     f"{mem[1] * MIB / GB:.2f} GB", f"+{(mem[0] - mem[1]) * MIB / GB:.2f} GB"))
    busy_rates = (busy or {}).get("rates") or {}
    add("decode beside one busy process: runtime's choice vs all threads", busy_rates.get("busy, runtime's choice"),
        busy_rates.get("busy, all threads"), "tok/s", True)
    d_best = (alt.get("ours q4_k_m") or {}).get("best")
    add("decode q4_k_m vs bandwidth roofline ceiling (ours / ceiling)", d_best, roof.get("decode_ceiling_tok_s"),
        "tok/s", True)
    add("image encode vs roofline floor (floor / ours)", first(ours, "image_encode_s"), roof.get("encode_floor_s"),
        "s", False)
    png_ours = ((prep.get(ours) or {}).get("png") or {}).get("best_ms")
    png_llama = ((prep.get(llama) or {}).get("png") or {}).get("best_ms")
    add("preprocessing PNG vs llama.cpp's own (decode + resize + normalize)", png_ours, png_llama, "ms", False)
    for kind in ("png", "dicom16", "ct_series"):
        floor = ((prep.get(names.get("floor", "")) or {}).get(kind) or {}).get("best_ms")
        hf_ms = ((prep.get(hf) or {}).get(kind) or {}).get("best_ms")
        if floor and hf_ms:
            rows.append((f"preprocessing {kind}: best reachable vs HF (HF / file decode alone)",
                         f"{floor:.1f} ms decode", f"{hf_ms:.1f} ms", f"{hf_ms / floor:.2f}× at most"))
    add("load vs llama.cpp direct", _get(results, ours, "load_s"), _get(results, llama, "load_s"), "s", False)
    rss = [_get(results, n, "peak_rss_mb") for n in (ours, llama)]
    add("peak RSS vs llama.cpp direct (one image)", *(None if v is None else v * MIB / GB for v in rss), "GB", False)
    return rows
