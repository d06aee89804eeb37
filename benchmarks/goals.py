"""The benchmark's goals as data, and the measurements that decide them, from one run's results.

Each ratio is measured against an anchor from the same run on the same machine (STYLE.md, habit 6).
A goal is either `at_least` a ratio (higher is better) or `at_most` a limit (lower is better).
A goal measured in alternating rounds (decode) carries its spread, the interquartile range of the
per-round ratios (benchmarks.alternate), and is called on it: met when the whole spread clears the
target, missed when the whole spread falls short, "within noise" when the target lies inside it.
A goal measured once is called on its value.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.alternate import SPREAD, paired, paired_rates
from benchmarks.tables import GB, MIB, num, span, spread, times

MET, MISSED, NOISE, UNMEASURED = "met", "missed", "within noise", "not measured"
DECODE_VS_LLAMA = 0.97  # ours / llama.cpp's own `Llama` on the same GGUF
BUSY_OVER_QUIET = 0.5  # decode beside one busy process / quiet, the runtime's thread choice
RSS_BOUND_GB = 4.5  # peak RSS, every default vision path, one image


@dataclass
class Goal:
    name: str
    target: float
    mode: str  # "at_least" | "at_most"
    unit: str = "x"  # "x" for a ratio, "s" or "GB" for a limit
    value: float | None = None  # the median of the rounds when there are rounds
    ours: str = ""  # what was measured, in words with units
    anchor: str = ""
    note: str = ""
    paired: dict | None = None  # per-round ratios (benchmarks.alternate.paired); None: measured once

    @property
    def low(self) -> float | None:
        return self.paired["q1"] if self.paired else None

    @property
    def high(self) -> float | None:
        return self.paired["q3"] if self.paired else None

    @property
    def status(self) -> str:
        """MET, MISSED, NOISE (the target lies inside the spread) or UNMEASURED."""
        if self.value is None:
            return UNMEASURED
        low, high = (self.low, self.high) if self.paired else (self.value, self.value)
        if self.mode == "at_least":
            return MET if low >= self.target else MISSED if high < self.target else NOISE
        return MET if high <= self.target else MISSED if low > self.target else NOISE

    @property
    def met(self) -> bool | None:
        """True when met, False when missed, None when within noise or not measured."""
        return {MET: True, MISSED: False}.get(self.status)

    def score(self) -> float | None:
        """value / target for at_least, target / value for at_most: >= 1 means the value clears it."""
        if self.value is None or self.value == 0:
            return None
        return self.value / self.target if self.mode == "at_least" else self.target / self.value

    def shown(self, v: float | None) -> str:
        return times(v) if self.unit == "x" else num(v, self.unit)

    def target_text(self) -> str:
        return f"≥ {self.target:g}×" if self.mode == "at_least" else f"≤ {self.target:g} {self.unit}"

    def spread_text(self) -> str:
        return spread(self.paired)

    def verdict(self) -> str:
        status = self.status
        if status == UNMEASURED:
            return status + (f" ({self.note})" if self.note else "")
        if status == MET:
            return status
        if status == NOISE:
            return f"{status}: {SPREAD} {span(self.low, self.high, self.unit)} spans {self.target_text()}"
        if self.mode == "at_least":
            gap = f"{1 - self.value / self.target:.0%} short"
        else:
            gap = f"{self.value / self.target - 1:.0%} over"
        whole = f", whole {SPREAD} {'below' if self.mode == 'at_least' else 'above'}" if self.paired else ""
        return f"{status}: {self.shown(self.value)} vs {self.target_text()} ({gap}{whole})"

    def record(self) -> dict:
        """What results.json keeps of the goal."""
        return {**self.__dict__, "met": self.met, "status": self.status, "verdict": self.verdict()}


def _get(results: dict, name: str | None, *path):
    node = results.get(name) or {}
    for key in path:
        node = (node or {}).get(key) if isinstance(node, dict) else None
    return node


def _ratio(num_, den):
    return None if not num_ or not den else num_ / den


def paired_goal(name: str, target: float, p: dict | None, **text) -> Goal:
    """An at_least goal on paired per-round ratios (benchmarks.alternate.paired): median and IQR."""
    return Goal(name, target, "at_least", value=p and p["median"], paired=p, **text)


def median_rate(pair: dict, name: str):
    return (pair.get(name) or {}).get("median")


def busy_ratio(busy: dict | None, num_: str, den: str) -> tuple[float | None, dict | None]:
    """Ratio of two conditions of benchmarks.bench_busy: paired over its rounds when it has them
    (older results hold one best rate per condition), else the plain ratio of the rates."""
    rounds, rates = (busy or {}).get("rounds") or {}, (busy or {}).get("rates") or {}
    p = paired(rounds.get(num_), rounds.get(den)) if rounds else None
    return (p["median"] if p else _ratio(rates.get(num_), rates.get(den))), p


def evaluate(data: dict) -> list[Goal]:
    """The goals of one run. data: results.json's fields — results (spec name -> model-phase
    result), names (role -> spec name: 'ours' the default bundle with vision auto, 'prepared',
    'llama', 'hf', 'ours_paths' every default vision path), alternating (quant -> engine -> rates
    per round), busy (benchmarks.bench_busy), machine.simd (the encode goal against transformers
    depends on VNNI)."""
    results, names = data["results"], data["names"]
    ours, llama, hf = names["ours"], names["llama"], names["hf"]
    first = lambda name, key: _get(results, name, "first", key)  # noqa: E731
    goals = []

    t_cold, t_prep = first(ours, "ttft_s"), first(names.get("prepared"), "ttft_s")
    goals.append(Goal("TTFT, first question about a pre-encoded study, new process", 3.0, "at_most", unit="s",
                      value=t_prep, ours=num(t_prep, "s"), anchor=num(t_cold, "s cold")))
    vision = _get(results, ours, "vision") or "?"
    for who, name, target in (("llama.cpp direct", llama, 3.0), ("transformers fp32", hf, 1.5)):
        theirs = first(name, "ttft_s")
        goals.append(Goal(f"TTFT, cold first question ({vision}) vs {who}", target, "at_least",
                          value=_ratio(theirs, t_cold), ours=num(t_cold, "s"), anchor=num(theirs, "s")))
    e_ours = first(ours, "image_encode_s")
    vnni = bool(set((data.get("machine") or {}).get("simd") or ()) & {"avx512_vnni", "avx_vnni", "amx_int8"})
    for who, name, target in (("llama.cpp's own path", llama, 2.0),
                              ("transformers fp32", hf, 2.0 if vnni else 1.3)):
        theirs = first(name, "image_encode_s")
        goals.append(Goal(f"image encode, fastest faithful path ({vision}) vs {who}", target, "at_least",
                          value=_ratio(theirs, e_ours), ours=num(e_ours, "s"), anchor=num(theirs, "s"),
                          note="" if theirs else f"{name} did not run"))

    for quant, pair in (data.get("alternating") or {}).items():
        if not pair:
            continue
        a, b = f"ours {quant}", f"llama.cpp {quant}"
        goals.append(paired_goal(f"decode vs llama.cpp direct, same file ({quant})", DECODE_VS_LLAMA,
                                 paired_rates(pair, a, b), ours=num(median_rate(pair, a), "tok/s"),
                                 anchor=num(median_rate(pair, b), "tok/s"),
                                 note="text prompt, alternating rounds in one process, medians"))
    busy = data.get("busy")
    b, q = (((busy or {}).get("rates") or {}).get(k) for k in ("busy, runtime's choice", "quiet, runtime's choice"))
    value, p = busy_ratio(busy, "busy, runtime's choice", "quiet, runtime's choice")
    text = {"ours": num(b, "tok/s busy"), "anchor": num(q, "tok/s quiet")}
    goals.append(Goal("decode with one competing busy process / quiet", BUSY_OVER_QUIET, "at_least", value=value,
                      paired=p, **text))

    paths = [n for n in names.get("ours_paths", [ours]) if _get(results, n, "peak_rss_mb")]
    rss = {n: _get(results, n, "peak_rss_mb") * MIB / GB for n in paths}
    worst = max(rss, key=rss.get) if rss else None
    goals.append(Goal("peak RSS, every default path, one image", RSS_BOUND_GB, "at_most", unit="GB",
                      value=rss.get(worst), ours=num(rss.get(worst), f"GB ({_get(results, worst, 'vision')})"),
                      anchor=", ".join(f"{_get(results, n, 'vision')} {v:.2f}" for n, v in rss.items())))
    load = _get(results, ours, "load_s")
    goals.append(Goal("load, warm page cache, bundle -> ready for an image question", 3.0, "at_most", unit="s",
                      value=load, ours=num(load, "s"), anchor=num(_get(results, llama, "load_s"), "s llama.cpp")))
    return goals


def counts(goals: list[Goal]) -> str:
    """"6 of 11 goals met, 1 within noise, 4 missed" (statuses that occur only)."""
    seen = [g.status for g in goals]
    parts = [f"{seen.count(s)} {s}" for s in (NOISE, MISSED, UNMEASURED) if seen.count(s)]
    return ", ".join([f"{seen.count(MET)} of {len(goals)} goals met", *parts])
