"""The benchmark's goal verdicts, its paired decode statistics, the computed reasons and the
machine-free paths of its results (benchmarks/goals.py, alternate.py, reasons.py, portable.py).
Fast: no model is loaded; the committed results serve as data."""

import copy
import json
from pathlib import Path

import pytest

from benchmarks.alternate import alternate, paired
from benchmarks.goals import MET, MISSED, NOISE, UNMEASURED, Goal, evaluate, paired_goal
from benchmarks.portable import portable, relative
from benchmarks.reasons import missed

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def committed() -> dict:
    data = json.loads((RESULTS / "results.json").read_text())
    data.pop("goals", None)
    return data


def _p(q1, median, q3):
    return {"q1": q1, "median": median, "q3": q3, "min": q1, "max": q3, "n": 7, "ratios": [q1, median, q3]}


@pytest.mark.parametrize("spread,status", [
    ((0.98, 1.00, 1.02), MET),  # the whole IQR clears the target
    ((0.97, 0.99, 1.01), MET),  # its low end on the target counts as clearing it
    ((0.90, 0.92, 0.96), MISSED),  # the whole IQR below
    ((0.95, 0.98, 1.01), NOISE),  # the median clears it, the spread does not
    ((0.93, 0.96, 0.99), NOISE),  # the median misses it, the spread does not
])
def test_a_paired_goal_is_called_on_its_spread(spread, status):
    g = paired_goal("decode", 0.97, _p(*spread))
    assert g.status == status, (spread, g.verdict())
    assert g.verdict().startswith(status)
    assert g.met is {MET: True, MISSED: False, NOISE: None}[status]


def test_a_goal_measured_once_is_called_on_its_value():
    assert Goal("ttft", 3.0, "at_most", unit="s", value=2.9).status == MET
    assert Goal("ttft", 3.0, "at_most", unit="s", value=3.1).status == MISSED
    assert Goal("x", 2.0, "at_least", value=1.5).verdict() == "missed: 1.50× vs ≥ 2× (25% short)"
    assert Goal("x", 2.0, "at_least", note="llama.cpp did not run").status == UNMEASURED
    assert paired_goal("decode", 0.97, None).status == UNMEASURED


def test_an_at_most_goal_with_a_spread():
    g = Goal("rss", 4.5, "at_most", unit="GB", value=4.4, paired=_p(4.3, 4.4, 4.6))
    assert g.status == NOISE, g.verdict()
    g.paired = _p(4.6, 4.7, 4.8)
    assert g.status == MISSED, g.verdict()


def test_paired_ratios_pair_rounds_and_skip_empty_ones():
    p = paired([10, 8, None, 9, 12], [10, 10, 9, 0, 10])
    assert p["ratios"] == [1.0, 0.8, 1.2] and p["n"] == 3
    assert p["median"] == pytest.approx(1.0) and p["min"] == 0.8 and p["max"] == 1.2
    assert p["q1"] == pytest.approx(0.9) and p["q3"] == pytest.approx(1.1)
    one = paired([5], [10])
    assert one["q1"] == one["median"] == one["q3"] == 0.5
    assert paired([None], [3]) is None and paired(None, [1]) is None


def test_alternate_warms_up_then_takes_turns():
    calls = []
    runs = {name: (lambda name=name: calls.append(name) or len(calls)) for name in ("a", "b")}
    out = alternate(runs, 3)
    assert calls == ["a", "b"] * 4, calls  # one warm-up turn, then three rounds
    assert out["a"]["rounds"] == [3, 5, 7] and out["b"]["rounds"] == [4, 6, 8]
    assert out["a"]["median"] == 5 and out["b"]["best"] == 8


def test_committed_results_decode_goals_carry_spreads_and_retired_goals_are_gone():
    goals = {g.name: g for g in evaluate(committed())}
    q4 = goals["decode vs llama.cpp direct, same file (q4_k_m)"]
    assert q4.paired and q4.paired["n"] >= 5 and q4.low <= q4.value <= q4.high, q4.record()
    assert "TTFT, first question about a pre-encoded study, new process" in goals
    retired = [n for n in goals if "file-decode floor" in n or "vs cold first question" in n]
    assert not retired, retired


def _decode_reason(data):
    goals = evaluate(data)
    return next(line for line in missed(goals, data) if "(q4_k_m)" in line)


def test_the_memory_conclusion_is_computed_from_the_run():
    """The repacked-weights clause compares the measured RSS with the goal's bound: shrink the
    measured memory cost and the conclusion turns."""
    data = committed()
    names, gib = data["names"], 1e9 / 2**20  # MiB in a GB
    dear, cheap = copy.deepcopy(data), copy.deepcopy(data)
    for d in (dear, cheap):
        d["results"][names["ours"]]["peak_rss_mb"] = 4.0 * gib  # the default path, one image: 4.0 GB
    text_rss = data["results"][names["text_q4"]]["peak_rss_mb"]
    dear["results"][names["repacked"]]["peak_rss_mb"] = text_rss + 1.0 * gib  # +1 GB: 5.0 GB
    cheap["results"][names["repacked"]]["peak_rss_mb"] = text_rss + 0.1 * gib  # +0.1 GB: 4.1 GB
    assert "makes 5.00 GB, above the 4.5 GB bound" in _decode_reason(dear), _decode_reason(dear)
    assert "makes 4.10 GB, within the 4.5 GB bound" in _decode_reason(cheap), _decode_reason(cheap)


def test_reasons_hold_no_prose_numbers():
    data = committed()
    text = "\n".join(missed(evaluate(data), data))
    for pasted in ("~", "memory wins", "ms on 2 threads"):
        assert pasted not in text, (pasted, text)


def test_paths_become_cache_relative_or_names():
    root = Path("/home/u/.cache/medgemma-edge")
    data = {"bundle": f"{root}/bench/bundles/b", "image_cache_dir": "/tmp/tmpab12/image-cache",
            "list": ["/elsewhere/x.png", "plain words, 8.2 tok/s, round 1/7"], "n": 3,
            "error": f"FileNotFoundError: '{root}/bench/inputs/xray.png' (and /tmp/tmpzz/job.json)",
            "command": "python -m benchmarks.run --out /home/u/reports --note 'a/b c'"}
    out = portable(data, root=root)
    assert out == {"bundle": "bench/bundles/b", "image_cache_dir": "image-cache",
                   "list": ["x.png", "plain words, 8.2 tok/s, round 1/7"], "n": 3,
                   "error": "FileNotFoundError: 'bench/inputs/xray.png' (and job.json)",
                   "command": "python -m benchmarks.run --out reports --note 'a/b c'"}, out
    assert relative(str(root), root) == "."


@pytest.mark.parametrize("name", ["results.json", "onnx_text.json",
                                  *sorted(p.relative_to(RESULTS).as_posix() for p in RESULTS.glob("*/*.json"))])
def test_committed_results_hold_no_machine_paths(name):
    def strings(node):
        if isinstance(node, dict):
            for v in node.values():
                yield from strings(v)
        elif isinstance(node, list):
            for v in node:
                yield from strings(v)
        elif isinstance(node, str):
            yield node

    data = json.loads((RESULTS / name).read_text())
    found = [s for s in strings(data) if s.startswith("/") or "/root/" in s or "/tmp/" in s or "/home/" in s]
    assert not found, found[:5]
