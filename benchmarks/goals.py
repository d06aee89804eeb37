"""Issue 7's goals as data, and the ratios that decide them, computed from one run's results.

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


def evaluate(results: dict, prep: dict, roof: dict, names: dict, alternating: dict | None = None) -> list[Goal]:
    """results: spec name -> model-phase result; prep: spec name -> {kind: timing}; names: role ->
    spec name ('ours', 'llama', 'hf', 'hf_text'); alternating: quant -> spec name -> decode rates
    from alternating rounds (the decode-vs-llama.cpp goals; the per-backend runs are in the tables)."""
    ours, llama, hf = names["ours"], names["llama"], names["hf"]
    goals = []

    for quant, pair in (alternating or {}).items():
        if not pair:
            continue
        a, b = (pair.get(f"{who} {quant}", {}).get("best") for who in ("ours", "llama.cpp"))
        goals.append(Goal(f"decode vs llama.cpp direct, same file ({quant})", 0.97, "at_least",
                          value=_ratio(a, b), ours=_fmt(a, "tok/s"), anchor=_fmt(b, "tok/s"),
                          note="text prompt, best of alternating rounds in one process"))
    d_ours = _get(results, ours, "first", "decode_tok_s")
    best_q4 = ((alternating or {}).get("q4_k_m") or {}).get("ours q4_k_m", {}).get("best")
    d_ours = max([v for v in (d_ours, best_q4) if v], default=None)
    ceiling = roof.get("decode_ceiling_tok_s")
    goals.append(Goal("decode vs bandwidth roofline", 0.80, "at_least", value=_ratio(d_ours, ceiling),
                      ours=_fmt(d_ours, "tok/s"), anchor=_fmt(ceiling, "tok/s ceiling"),
                      note="ceiling = numpy read bandwidth / text GGUF bytes"))

    e_ours, e_fast, path = _fastest_encode(results, ours, names.get("ours_vision"))
    e_hf = _get(results, hf, "first", "image_encode_s")
    e_llama = _get(results, llama, "first", "image_encode_s")
    goals.append(Goal("image encode vs transformers fp32", 3.0, "at_least", value=_ratio(e_hf, e_fast),
                      ours=_fmt(e_fast, f"s ({path})"), anchor=_fmt(e_hf, "s"),
                      note="" if e_hf else "transformers fp32 did not run"))
    goals.append(Goal("image encode vs llama.cpp's own path", 1.0, "at_least", value=_ratio(e_llama, e_ours),
                      ours=_fmt(e_ours, "s"), anchor=_fmt(e_llama, "s")))

    t1 = _get(results, ours, "first", "ttft_s")
    t2 = _get(results, ours, "follow_up", "ttft_s")
    goals.append(Goal("follow-up on the same image: TTFT first / follow-up", 10.0, "at_least",
                      value=_ratio(t1, t2), ours=_fmt(t2, "s follow-up"), anchor=_fmt(t1, "s first")))

    for kind in ("png", "dicom16", "ct_series"):
        mine = (prep.get(ours) or {}).get(kind) or {}
        theirs = (prep.get(hf) or {}).get(kind) or {}
        goals.append(Goal(f"preprocessing vs HF processor: {kind}", 5.0, "at_least",
                          value=_ratio(theirs.get("best_ms"), mine.get("best_ms")),
                          ours=_fmt(mine.get("best_ms"), "ms", 1), anchor=_fmt(theirs.get("best_ms"), "ms", 1)))

    rss_gb = [None if v is None else v * MIB / GB for v in (_get(results, n, "peak_rss_mb") for n in (ours, llama))]
    goals.append(Goal("peak RSS, q4_k_m + mmproj f16, one image", 4.5, "at_most", unit="GB", value=rss_gb[0],
                      ours=_fmt(rss_gb[0], "GB"), anchor=_fmt(rss_gb[1], "GB llama.cpp")))
    load = _get(results, ours, "load_s")
    goals.append(Goal("load, bundle -> ready for an image question", 3.0, "at_most", unit="s", value=load,
                      ours=_fmt(load, "s"), anchor=_fmt(_get(results, llama, "load_s"), "s llama.cpp")))
    return goals


def _fastest_encode(results: dict, ours: str, ours_vision: str | None) -> tuple:
    """(mmproj encode s, fastest of ours s, which path) — the onnx-int8 vision bundle when it ran."""
    mmproj = _get(results, ours, "first", "image_encode_s")
    onnx = _get(results, ours_vision, "first", "image_encode_s") if ours_vision else None
    if onnx and (not mmproj or onnx < mmproj):
        return mmproj, onnx, "onnx-int8 vision"
    return mmproj, mmproj, "mmproj f16"


def context_ratios(results: dict, prep: dict, roof: dict, names: dict) -> list[tuple[str, str, str, str]]:
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
    onnx_name = names.get("ours_vision")
    add("image encode: onnx-int8 vision vs our mmproj f16 path", first(onnx_name, "image_encode_s"),
        first(ours, "image_encode_s"), "s", False)
    add("TTFT, first question: onnx-int8 vision vs transformers fp32", first(onnx_name, "ttft_s"),
        first(hf, "ttft_s"), "s", False)
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
