"""Whole-model ONNX bundles against GGUF and against onnxruntime-genai's own Generator (issue 15).

    python -m benchmarks.bench_onnx_text [--quick] [--threads 2] [--tokens 32] [--rounds 5] [--wait-idle 60]

Same checkpoint (the MedGemma-4B-shaped one; --quick: tiny), same run, same text prompt (~160
tokens with the chat template), text only. Each entry runs in a fresh process (its peak RSS is its
own): load, one question, prefill tok/s, decode tok/s, TTFT, as the runtime reports them
(`Reply.stats`; the Generator's are timed the same way around its calls). Decode ratios come from
alternating rounds in one process (benchmarks.worker.run_alternating): best of `--rounds`.

    ours onnx-int4 / onnx-int8   medgemma_edge.load(ONNX bundle): our numpy KV loop on onnxruntime
    ours gguf q4_k_m / q8_0      medgemma_edge.load(GGUF bundle): llama.cpp
    genai Generator int8         onnxruntime-genai's Generator on the builder's own graph of the same
                                 checkpoint and quantization, full caches as ours (token ids in, its
                                 float32 embedding table inside, causal attention): our graph adds
                                 attention-bias inputs it cannot feed (benchmarks/backend_genai.py)

Goals: ONNX int4 decode ≥ 0.8 × GGUF q4_k_m; our loop ≥ 1.0 × the Generator (int8).
Writes benchmarks/results/onnx_text.json and ONNX_TEXT.md (quick runs: the cache folder).
Bundles are exported on first use (4B: int8 ~10 min, int4 k_quant ~40 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks import bundles
from benchmarks.backends import Case, Spec, say
from medgemma_edge.runtime.cache import cache_root

RESULTS = Path(__file__).parent / "results"
PAIRS = [("ours onnx-int4", "ours gguf q4_k_m", 0.8), ("ours onnx-int8", "ours gguf q8_0", None),
         ("ours onnx-int8", "genai Generator int8", 1.0)]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny test model (checks the harness)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--tokens", type=int, default=32, help="tokens decoded per question")
    p.add_argument("--rounds", type=int, default=5, help="alternating decode rounds per pair")
    p.add_argument("--wait-idle", type=float, default=0, metavar="S",
                   help="before each measurement, wait up to S seconds for other processes to go quiet")
    p.add_argument("--out", type=Path)
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
    from benchmarks.run import machine, run_worker, wait_for_quiet
    from medgemma_edge.runtime.machine import physical_cores

    args = parse_args(sys.argv[1:] if argv is None else argv)
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
            job = {"specs": [by_name[a].to_dict(), by_name[b].to_dict()], "case": asdict(case),
                   "phase": "alternating", "repeat": args.rounds}
            decode[f"{a} | {b}"] = run_worker(job, f"{a} vs {b}", Path(tmp)).get("decode")
    data = {"command": " ".join(["python -m benchmarks.bench_onnx_text", *(argv or sys.argv[1:])]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": ckpt.name, "machine": info,
            "threads": threads, "case": asdict(case), "results": results, "alternating": decode,
            "seconds": round(time.perf_counter() - t0, 1)}
    data["goals"] = goals(decode)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "onnx_text.json").write_text(json.dumps(data, indent=2))
    md = report(data)
    (out_dir / "ONNX_TEXT.md").write_text(md)
    print(md)
    return data


def text_files(spec: Spec) -> list[Path]:
    """The files an entry reads to answer a text question (not the vision files)."""
    if spec.kind == "genai":
        return [p for p in Path(spec.options["decoder_dir"]).glob("model.onnx*")]
    manifest = json.loads((Path(spec.options["bundle"]) / "manifest.json").read_text())
    return [Path(spec.options["bundle"]) / f["path"] for f in manifest["files"] if f["role"] != "vision"]


def goals(decode: dict) -> list[dict]:
    out = []
    for a, b, goal in PAIRS:
        rates = decode.get(f"{a} | {b}") or {}
        ra, rb = (rates.get(a) or {}).get("best"), (rates.get(b) or {}).get("best")
        ratio = ra / rb if ra and rb else None
        out.append({"pair": f"{a} / {b}", "ours": ra, "theirs": rb, "ratio": ratio, "goal": goal,
                    "met": None if goal is None or ratio is None else ratio >= goal})
    return out


def goal_text(goal) -> str:
    return "—" if goal is None else f"≥ {goal}"


def report(data: dict) -> str:
    m = data["machine"]
    lines = [f"# ONNX bundles vs GGUF vs onnxruntime-genai ({data['model']})", "",
             f"`{data['command']}` — {data['date']}, {m['cpu']}, SIMD {' '.join(m.get('simd', []))}, "
             f"{data['threads']} threads, {data['case']['decode_tokens']} tokens decoded, {data['seconds']:.0f} s.", "",
             "| entry | load s | prompt tokens | prefill tok/s | TTFT s | decode tok/s | peak RSS GB |",
             "|---|---|---|---|---|---|---|"]
    for name, r in data["results"].items():
        t = r.get("text") or {}
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} | | | | | |")
            continue
        lines.append(f"| {name} | {r.get('load_s', 0):.2f} | {t.get('prompt_tokens')} | {t.get('prefill_tok_s')} | "
                     f"{t.get('ttft_s')} | {t.get('decode_tok_s')} | {r.get('peak_rss_mb', 0) / 1024:.2f} |")
    lines += ["", "Decode, alternating rounds in one process (best of each):", "",
              "| pair | ours tok/s | theirs tok/s | ratio | goal | met |", "|---|---|---|---|---|---|"]
    for g in data["goals"]:
        fmt = lambda x: "—" if x is None else f"{x:.2f}"  # noqa: E731
        met = "—" if g["met"] is None else ("yes" if g["met"] else "**no**")
        lines.append(f"| {g['pair']} | {fmt(g['ours'])} | {fmt(g['theirs'])} | {fmt(g['ratio'])} | "
                     f"{goal_text(g['goal'])} | {met} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
