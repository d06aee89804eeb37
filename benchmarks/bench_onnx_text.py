"""Whole-model ONNX bundles against GGUF and against onnxruntime-genai's own Generator (issue 15).

    python -m benchmarks.bench_onnx_text [--quick] [--threads 2] [--tokens 64] [--rounds 7] [--wait-idle 60]
    python -m benchmarks.bench_onnx_text --from benchmarks/results/onnx_text.json   # re-render, no rerun

Same checkpoint (the MedGemma-4B-shaped one; --quick: tiny), same run, same text prompt (~160
tokens with the chat template), text only. Each entry runs in a fresh process (its peak RSS is its
own): load, one question, prefill tok/s, decode tok/s, TTFT, as the runtime reports them
(`Reply.stats`; the Generator's are timed the same way around its calls). Decode ratios come from
alternating rounds in one process (benchmarks.worker.run_alternating, at least MIN_TOKENS a round):
the median of the per-round ratios with their spread, on which the goals are called
(benchmarks.goals).

    ours onnx-int4 / onnx-int8   medgemma_edge.load(ONNX bundle): our numpy KV loop on onnxruntime
    ours gguf q4_k_m / q8_0      medgemma_edge.load(GGUF bundle): llama.cpp
    genai Generator int8         onnxruntime-genai's Generator on the builder's own graph of the same
                                 checkpoint and quantization, full caches as ours (token ids in, its
                                 float32 embedding table inside, causal attention): our graph adds
                                 attention-bias inputs it cannot feed (benchmarks/backend_genai.py)

Goals: ONNX int4 decode ≥ 0.8 × GGUF q4_k_m; our loop ≥ 1.0 × the Generator (int8).
Writes benchmarks/results/onnx_text.json and ONNX_TEXT.md (quick runs: the cache folder).
Bundles are exported on first use (at 4B the int4 k_quant export is the slow one).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks import bundles
from benchmarks.alternate import MIN_ROUNDS, MIN_TOKENS, paired_rates
from benchmarks.backends import Case, Spec, say
from benchmarks.goals import Goal, median_rate, paired_goal
from benchmarks.portable import portable
from benchmarks.tables import num, spread, table, times
from medgemma_edge.runtime.cache import cache_root

RESULTS = Path(__file__).parent / "results"
PAIRS = [("ours onnx-int4", "ours gguf q4_k_m", 0.8), ("ours onnx-int8", "ours gguf q8_0", None),
         ("ours onnx-int8", "genai Generator int8", 1.0)]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny test model (checks the harness)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--tokens", type=int, default=MIN_TOKENS,
                   help="tokens decoded per question (decode rounds: at least MIN_TOKENS)")
    p.add_argument("--rounds", type=int, default=MIN_ROUNDS, help="alternating decode rounds per pair")
    p.add_argument("--wait-idle", type=float, default=0, metavar="S",
                   help="before each measurement, wait up to S seconds for other processes to go quiet")
    p.add_argument("--out", type=Path)
    p.add_argument("--from", dest="source", type=Path, metavar="ONNX_TEXT_JSON",
                   help="re-render ONNX_TEXT.md beside this onnx_text.json instead of measuring")
    return p.parse_args(argv)


def entries(ckpt: Path, threads: int, genai_dir: Path) -> list[Spec]:
    from benchmarks.backend_genai import build_genai_decoder

    onnx4, onnx8 = bundles.onnx_bundle(ckpt, "int4", threads=threads), bundles.onnx_bundle(ckpt, "int8", threads=threads)
    q4, q8 = bundles.bundle(ckpt, "q4_k_m", bundles.DEFAULT, quality="vision"), bundles.bundle(ckpt, "q8_0")
    graph = build_genai_decoder(ckpt, genai_dir, "int8", windowed=False, threads=threads)  # full caches, as ours
    ours = lambda name, b: Spec(name, "ours", {"bundle": str(b), "threads": threads, "open_vision": False},  # noqa: E731
                                image=False)
    return [ours("ours onnx-int4", onnx4), ours("ours onnx-int8", onnx8), ours("ours gguf q4_k_m", q4),
            ours("ours gguf q8_0", q8),
            Spec("genai Generator int8", "genai", {"decoder_dir": str(graph), "tokenizer": str(onnx8 / "tokenizer.gguf"),
                                                    "threads": threads}, image=False)]


def main(argv=None) -> dict:
    from benchmarks.run import decode_case, machine, run_worker, wait_for_quiet
    from medgemma_edge.runtime.machine import physical_cores

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.source:
        data = json.loads(args.source.read_text())
        print(write(args.source.parent, data))
        return data
    threads = args.threads or physical_cores()
    t0 = time.perf_counter()
    info = machine()
    if args.quick:
        from medgemma_edge.testing.models import build_tiny

        ckpt, out_dir = build_tiny(), args.out or cache_root() / "bench" / "results-quick"
    else:
        from benchmarks.checkpoint4b import build_4b

        ckpt, out_dir = build_4b(), args.out or RESULTS
    specs = entries(ckpt, threads, cache_root() / "bench" / "genai" / f"{ckpt.name}-int8-fullkv")
    case = Case(image="", decode_tokens=args.tokens, text_prompt_words=120, threads=threads)
    results, decode = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in specs:
            if args.wait_idle:
                wait_for_quiet(args.wait_idle)
            bundles.warm(text_files(spec))  # loads from the page cache, as every entry's
            say(f"[onnx-text] {spec.name} ...")
            results[spec.name] = run_worker({"spec": spec.to_dict(), "case": asdict(case), "phase": "model",
                                             "inputs": [], "repeat": 0}, spec.name, Path(tmp))
        by_name = {s.name: s for s in specs}
        for a, b, _ in PAIRS:
            if args.wait_idle:
                wait_for_quiet(args.wait_idle)
            bundles.warm(text_files(by_name[a]) + text_files(by_name[b]))
            job = {"specs": [by_name[a].to_dict(), by_name[b].to_dict()], "case": asdict(decode_case(case)),
                   "phase": "alternating", "repeat": args.rounds}
            decode[f"{a} | {b}"] = run_worker(job, f"{a} vs {b}", Path(tmp)).get("decode")
    data = {"command": shlex.join(["python", "-m", "benchmarks.bench_onnx_text", *argv]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": ckpt.name, "machine": info,
            "threads": threads, "case": asdict(case), "results": results, "alternating": decode,
            "alternating_tokens": decode_case(case).decode_tokens, "seconds": round(time.perf_counter() - t0, 1)}
    print(write(out_dir, data))
    return data


def write(out_dir: Path, data: dict) -> str:
    """onnx_text.json (goals evaluated, paths portable) and ONNX_TEXT.md into out_dir; the markdown."""
    data.update(portable({**data, "goals": [g.record() for g in goals(data["alternating"])]}))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "onnx_text.json").write_text(json.dumps(data, indent=2) + "\n")
    md = report(data)
    (out_dir / "ONNX_TEXT.md").write_text(md)
    return md


def text_files(spec: Spec) -> list[Path]:
    """The files an entry reads to answer a text question (not the vision files)."""
    if spec.kind == "genai":
        return [p for p in Path(spec.options["decoder_dir"]).glob("model.onnx*")]
    manifest = json.loads((Path(spec.options["bundle"]) / "manifest.json").read_text())
    return [Path(spec.options["bundle"]) / f["path"] for f in manifest["files"] if f["role"] != "vision"]


def pairs(decode: dict) -> list[dict]:
    """Per pair: the median rates, the paired per-round ratios (benchmarks.alternate.paired) and
    its goal, called on them (None for a pair without a target)."""
    out = []
    for a, b, target in PAIRS:
        rates = decode.get(f"{a} | {b}") or {}
        p = paired_rates(rates, a, b)
        text = {"ours": num(median_rate(rates, a)), "anchor": num(median_rate(rates, b))}
        out.append({"pair": f"{a} / {b}", "paired": p, **text,
                    "goal": paired_goal(f"decode {a} / {b}", target, p, **text) if target else None})
    return out


def goals(decode: dict) -> list[Goal]:
    return [r["goal"] for r in pairs(decode) if r["goal"]]


def entries_table(data: dict) -> list[str]:
    rows = []
    for name, r in data["results"].items():
        if "error" in r:
            rows.append((name, f"error: {r['error']}", "", "", "", "", ""))
            continue
        t = r.get("text") or {}
        rows.append((name, num(r.get("load_s")), t.get("prompt_tokens", "—"), num(t.get("prefill_tok_s")),
                     num(t.get("ttft_s")), num(t.get("decode_tok_s")),
                     num(None if r.get("peak_rss_mb") is None else r["peak_rss_mb"] / 1024)))
    return table(("entry", "load s", "prompt tokens", "prefill tok/s", "TTFT s", "decode tok/s", "peak RSS GB"), rows)


def decode_table(data: dict) -> list[str]:
    rows = [(r["pair"], r["ours"], r["anchor"], times(r["paired"] and r["paired"]["median"]),
             spread(r["paired"]), r["goal"].target_text() if r["goal"] else "—",
             r["goal"].verdict() if r["goal"] else "—") for r in pairs(data["alternating"])]
    return table(("pair", "ours tok/s", "theirs tok/s", "ratio", "spread", "goal", "result"), rows)


def report(data: dict) -> str:
    from benchmarks.report import alternating_rounds, too_few_rounds

    m = data["machine"]
    rounds, tokens = alternating_rounds(data)
    lines = [f"# ONNX bundles vs GGUF vs onnxruntime-genai ({data['model']})", "",
             f"`{data['command']}` — {data['date']}, {m['cpu']}, SIMD {' '.join(m.get('simd', []))}, "
             f"{data['threads']} threads, {data['case']['decode_tokens']} tokens decoded, {data['seconds']:.0f} s.", "",
             *entries_table(data), "",
             f"Decode, alternating rounds in one process ({rounds} rounds of {tokens} tokens; tok/s are medians, "
             f"the ratio is the median of the per-round ratios, the spread their interquartile range).{too_few_rounds(data)}",
             "",
             *decode_table(data)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
