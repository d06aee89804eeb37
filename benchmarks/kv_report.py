"""The KV cache benchmark's report (benchmarks/bench_kv.py measures; this reads its kv_cache.json):
KV_CACHE.md, the section REPORT.md carries (benchmarks/report.py) and what benchmarks/quotes.py's
`kv-cache` block shows, and the decision on the default it supports.

The decision rule, fixed before the numbers: q8_0 becomes the default for prepared studies only if
it is faithful AND its gain is large.
  faithful: it keeps the reference's top-1 at every decisive position, and its mean KL against the
            default path is at most KL_SHARE of what the q8_0 weights export costs (measured beside
            it): the cache must stay a small error next to a quantization the project ships.
  large:    the 85-slice CT's saved prefix is at most SIZE_RATIO of f16's, restoring it is not
            slower, and decode after it keeps DECODE_RATIO of f16's speed (the decode goals' bar).
A prepared prefix restores only into a context of its own cache type, so a q8_0 default for prepared
studies would be q8_0 (and flash attention) for every answer of a server that prepares them.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.alternate import SPREAD
from benchmarks.portable import portable
from benchmarks.tables import num, paired_ratio, table

KL_SHARE = 0.5
SIZE_RATIO = 0.6
DECODE_RATIO = 0.97  # benchmarks/goals.DECODE_VS_LLAMA's bar: within noise of "not slower"
MB = 1e6


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f} %"


def _mb(v) -> str:
    return "—" if v is None else f"{v / MB:,.1f} MB"


Q8, FA, QUANT_ONLY = ("q8_0 cache (flash attention)", "f16 cache, flash attention",
                      "q8_0 cache vs f16 cache, both with flash attention")  # benchmarks/bench_kv.py's names


def decision(data: dict) -> dict:
    """{"default": "f16" | "q8_0", "faithful", "large", "why": [sentences]} from the measurements:
    faithful on every weights export measured, the gain at the 4B shape."""
    f = data["faithfulness"]
    anchor = f["weights"]["q8_0"]["mean_kl"]
    caches = {w: c[Q8] for w, c in f["caches"].items()}
    faithful = all(r["decisive_flips"] == 0 and r["mean_kl"] <= KL_SHARE * anchor for r in caches.values())
    types, prep = data["prepared"]["types"], data["prepared"]
    size = types["q8_0"]["ct_bytes"] / types["f16"]["ct_bytes"]
    restore = types["q8_0"]["restore"]["median_s"] / types["f16"]["restore"]["median_s"]
    dec = (prep.get("paired_decode") or {}).get("median")
    large = size <= SIZE_RATIO and restore <= 1.0 and dec is not None and dec >= DECODE_RATIO
    why = [f"faithful: {'yes' if faithful else 'no'} — " + "; ".join(
               f"{w} weights: {r['decisive_flips']} decisive top-1 flips of {r['decisive']}, mean KL "
               f"{r['mean_kl']:.4f} = {r['mean_kl'] / anchor:.2f} of the q8_0 weights' {anchor:.4f}"
               for w, r in caches.items()) + f" (no flip and at most {KL_SHARE} wanted)",
           f"gain large: {'yes' if large else 'no'} — CT prefix {size:.2f} of f16's size (at most {SIZE_RATIO}), "
           f"restore {restore:.2f} of f16's time (at most 1), decode {num(dec)}× f16's (at least {DECODE_RATIO})"]
    return {"default": "q8_0" if faithful and large else "f16", "faithful": faithful, "large": large, "why": why}


def _row(label: str, r: dict) -> tuple:
    decode = r.get("decode") or {}
    return (label, r["positions"], f"{r['mean_kl']:.4f}", num(decode.get("mean_kl"), digits=4), f"{r['p99_kl']:.4f}",
            f"{r['max_kl']:.4f}", _pct(r["top1"]), f"{_pct(r['decisive_top1'])} ({r['decisive_flips']} flips of "
            f"{r['decisive']})")


def faithfulness_table(data: dict) -> list[str]:
    f = data["faithfulness"]
    rows = [_row(f"{w} weights: {name}", r) for w, per in f["caches"].items() for name, r in per.items()]
    rows += [_row(f"{w} weights vs f32 weights, both {f['reference']}", r) for w, r in f["weights"].items()]
    return table(("compared (against the same weights' f16 cache, flash attention off, unless named)",
                  "positions", "mean KL", "mean KL, decode steps", "p99 KL", "max KL", "top-1", "decisive top-1"),
                 rows)


def block_lines(data: dict) -> list[str]:
    blocks = data["faithfulness"].get("image_blocks")
    if not blocks:
        return []
    per = blocks["kl_after_block"]
    names = list(next(iter(next(iter(per.values())).values())))
    rows = [(f"{w} weights, {kind}", *(f"{v[n]:.4f}" for n in names))
            for w, kinds in per.items() for kind, v in kinds.items()]
    return ["### An image-like block (256 rows, bidirectional)", "", *table(("block", *names), rows), "",
            f"Mean KL at the text after the block against the default path, {blocks['windows']} blocks each. "
            "Token rows: "
            "the scaled token embeddings of real text, activations the weights know; noise rows: the same norms, "
            "random directions, activations they never saw. The causal control is large, so the measure sees the "
            "mask: flash attention keeps the block bidirectional. Real MedGemma image embeddings are not available "
            "here; where theirs fall between these two kinds is not measured.", ""]


def _sizes(entry: dict) -> dict[int, dict]:
    """A cache type's sizes by positions (JSON keeps the counts as strings)."""
    return {int(k): v for k, v in entry["sizes"].items()}


def size_table(data: dict) -> list[str]:
    prep = data["prepared"]
    types = prep["types"]
    counts = sorted({int(c) for t in types.values() for c in t["sizes"]})
    rows = []
    for kv, t in types.items():
        sizes = _sizes(t)
        fit, r = t["fit"], t.get("restore") or {}
        rows.append((kv + (", flash attention" if t["flash_attn"] else ""),
                     *(_mb(sizes[c]["bytes"]) if c in sizes else "—" for c in counts),
                     f"{fit['full_layers_bytes_per_position'] / 1e3:,.1f} kB + "
                     f"{fit['window_layers_bytes_per_position'] / 1e3:,.1f} kB", f"**{_mb(t['ct_bytes'])}**",
                     f"{num(r.get('median_s'), 's')} ({num(r.get('min_s'))}–{num(r.get('max_s'))})",
                     num(sizes[max(counts)].get("prefill_tok_s"), "tok/s", 1)))
    window = next(iter(types.values()))["fit"]["window"]
    return table(("cache", *(f"state at {c} positions" for c in counts),
                  f"per position: global layers + sliding-window layers (up to {window} positions)",
                  f"{prep['ct_slices']}-slice CT ({prep['ct_prefix_positions']:,} positions, extrapolated)",
                  f"restore {max(counts)} positions, warm (median, range)", f"prefill to {max(counts)}"), rows)


def decode_lines(data: dict) -> list[str]:
    prep = data["prepared"]
    dec = prep.get("decode") or {}
    rows = [(kv, num((dec.get(kv) or {}).get("median"), "tok/s"),
             ", ".join(f"{v:.2f}" for v in (dec.get(kv) or {}).get("rounds") or () if v)) for kv in prep["types"]]
    return [*table(("cache", "decode, median", "per round, tok/s"), rows), "",
            f"q8_0 / f16: {paired_ratio(prep.get('paired_decode'))} — median of the per-round ratios and their "
            f"{SPREAD}."]


def restore_estimates(data: dict) -> str:
    """The CT prefix's restore, estimated from the measured one: warm in proportion to the bytes, and the
    disk read of a cold page cache at the measured read speed."""
    prep = data["prepared"]
    warm = {kv: t["restore"]["median_s"] * t["ct_bytes"] / _sizes(t)[t["restore"]["positions"]]["bytes"]
            for kv, t in prep["types"].items()}
    out = (f"Estimates for the {prep['ct_slices']}-slice CT's prefix (not measured): a warm restore in proportion to "
           "its bytes, " + ", ".join(f"{num(s, 's', 2)} ({kv})" for kv, s in warm.items()) + ". ")
    speed = prep.get("disk_read_gb_s")
    if not speed:
        return out + "Disk read speed: not measured (the file system refused direct reads)."
    cold = {kv: t["ct_bytes"] / (speed * 1e9) for kv, t in prep["types"].items()}
    return out + (f"Disk read speed past the page cache: {speed:.2f} GB/s (dd iflag=direct on the f16 state file), "
                  "so a cold page cache adds about " + ", ".join(f"{num(s, 's', 1)} ({kv})" for kv, s in cold.items())
                  + " of reading (size / read speed).")


def decision_lines(data: dict) -> list[str]:
    d = decision(data)
    head = ("- decision: **f16** stays the default" if d["default"] == "f16"
            else "- decision: **q8_0** for prepared studies")
    return [head, *(f"  - {w}" for w in d["why"])]


def summary_lines(data: dict, report_link: str) -> list[str]:
    """The short form REPORT.md and the docs carry."""
    f, prep = data["faithfulness"], data["prepared"]
    per = "; ".join(f"{w} weights: q8_0 cache {c[Q8]['mean_kl']:.4f} (decisive top-1 {_pct(c[Q8]['decisive_top1'])}), "
                    f"flash attention alone {c[FA]['mean_kl']:.4f}" for w, c in f["caches"].items())
    q8 = next(iter(f["caches"].values()))[Q8]
    types = prep["types"]
    m = data["machine"]
    blocks = (f.get("image_blocks") or {}).get("kl_after_block") or {}
    block = "; ".join(f"{w} weights {v['token rows'][Q8]:.4f} after real text's rows, {v['noise rows'][Q8]:.4f} after "
                      f"noise rows of the same norm" for w, v in blocks.items())
    return [f"- faithfulness (real Gemma 3 270M, {q8['positions']} teacher-forced positions, mean KL against the same "
            f"weights' f16 cache without flash attention): {per}; for scale, the q8_0 weights export against f32 "
            f"{f['weights']['q8_0']['mean_kl']:.4f}.",
            *([f"- after an image-like block (256 rows, bidirectional), q8_0 cache: {block} (activations the weights "
               "never saw; where real MedGemma image embeddings fall is not measured here)."] if block else []),
            f"- prepared {prep['ct_slices']}-slice CT at the 4B shape ({prep['ct_prefix_positions']:,} positions, "
            f"extrapolated from states of {', '.join(str(c) for c in sorted(_sizes(types['f16'])))} "
            f"positions): f16 {_mb(types['f16']['ct_bytes'])}, q8_0 {_mb(types['q8_0']['ct_bytes'])}; restore of "
            f"{types['f16']['restore']['positions']} positions (warm) {num(types['f16']['restore']['median_s'], 's')} "
            f"vs {num(types['q8_0']['restore']['median_s'], 's')}.",
            f"- decode after a restored {types['f16']['restore']['positions']}-position prefix, q8_0 / f16: "
            f"{paired_ratio(prep.get('paired_decode'))}.",
            *decision_lines(data),
            f"- `{data['command']}`, {data['date']}"
            + (f" (its {kp['part']} part: `{kp['command']}`, {kp['date']})" if (kp := data.get("kept_part")) else "")
            + f", {m['cpu']} ({', '.join(m.get('simd', []))}), {data['threads']} thread(s) "
            f"([KV_CACHE.md]({report_link}))."]


def report(data: dict) -> str:
    m, f = data["machine"], data["faithfulness"]
    prep = data["prepared"]
    return "\n".join([
        f"# {data['title']}", "",
        f"`{data['command']}` — {data['date']}, {m['cpu']}, SIMD {' '.join(m.get('simd', []))}, "
        f"{data['threads']} thread(s), {data['seconds'] / 60:.0f} min; load average {m['load_start']:.2f} at the "
        "start, "
        f"{m.get('load_end', float('nan')):.2f} at the end."
        + (f" The {kp['part']} part is from an earlier run: `{kp['command']}`, {kp['date']}."
           if (kp := data.get("kept_part")) else ""), "",
        "## Decision", "", *decision_lines(data), "",
        "## Faithfulness (real Gemma 3 270M)", "", *faithfulness_table(data), "",
        f"{f['sequences']} sequences (the export's quality exchanges and tests/data/medical_text.txt), teacher-forced: "
        "each one's first half in one batch (as a prepared prefix), the second half one token at a time (as an "
        "answer is decoded; llama.cpp's CPU flash attention has another kernel for one query row), the decode steps' "
        "mean KL also on its own. "
        f"KL(reference || other) in nats per position; decisive: the reference's top-1 leads its runner-up by at "
        f"least {f['decisive_gap_nats']} nat (export/quality.DECISIVE_GAP). q8_0 cannot run without flash "
        "attention in llama.cpp, so its rows carry both; the rows 'q8_0 cache vs f16 cache, both with flash "
        "attention' are the cache type's own effect (against the f16 cache with flash attention).", "",
        *block_lines(data),
        "## Prepared study at the MedGemma-4B shape", "", *size_table(data), "",
        "A saved state holds every position of the global layers but only the last window of the sliding-window "
        "ones (llama.cpp's state_write_data skips what the window masks), so its size is linear in positions up "
        "to the window and grows more slowly past it (worst residual of that two-slope fit: "
        + ", ".join(f"{kv} {t['fit']['worst_residual']:.1e}" for kv, t in prep["types"].items())
        + f"); the CT column is that fit at the {prep['ct_prefix_positions']:,} positions of the runtime's own "
        f"{prep['ct_slices']}-slice prompt (system prompt, image blocks, slice labels), not a measurement. Restore: "
        "read the state file (warm page cache) and `load_state` into the running context; alternating rounds. "
        "Prefill: image blocks of random embeddings, one run each.", "",
        restore_estimates(data), "",
        f"## Decode after a restored {max(_sizes(prep['types']['f16']))}-position prefix", "",
        *decode_lines(data), "",
        f"Each round restores the prefix, evaluates a {prep['question_tokens']}-token question and decodes "
        f"{prep['decode_tokens']} tokens greedily, f16 and q8_0 back to back (a warm-up round first).", ""]) + "\n"


def write(out_dir: Path, data: dict) -> str:
    data.update(portable({**data, "decision": decision(data)}))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "kv_cache.json").write_text(json.dumps(data, indent=2) + "\n")
    md = report(data)
    (out_dir / "KV_CACHE.md").write_text(md)
    return md


def read(folder: Path) -> dict | None:
    """kv_cache.json in `folder`; None until benchmarks/bench_kv.py has been run."""
    path = Path(folder) / "kv_cache.json"
    return json.loads(path.read_text()) if path.is_file() else None
