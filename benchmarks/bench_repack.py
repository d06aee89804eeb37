"""Repacked weights at the default's memory (issue 26): llama.cpp's repacked weights loaded with and
without mmap, against our plain default and llama-cpp-python's own `Llama`, same GGUF.

    python -m benchmarks.bench_repack [--bundle DIR] [--threads 2] [--rounds 7] [--wait-idle 60]
    python -m benchmarks.bench_repack --from benchmarks/results/repack.json   # re-render, no rerun

Variants, on the text GGUF of the 4B-shaped q4_k_m bundle (random weights), text only, greedy:
  DEFAULT  ours, load(repack=False): the file mmapped, llama.cpp's plain kernels (the default before)
  MAPPED   ours, repacked weights beside the mmapped file (what --repack-weights did before)
  KEPT     ours, load(repack=True): repacked weights, the file read without mmap
  LLAMA    llama-cpp-python's `Llama` with its defaults (repacked weights, the file mmapped)
Peak RSS (VmHWM): each variant in its own process (benchmarks.worker's model phase: load, one text
answer of RSS_TOKENS tokens). Decode: the four in one process, alternating rounds of a ~40-word prompt
then --tokens greedy tokens (benchmarks.alternate; the context is the runtime's default 4096), ours on
all threads as `Llama` is (OursVariant: the runtime's thread choice beside other work is left out).

Goal, per repacking variant of ours: median per-round decode ratio to LLAMA >= SPEED_GOAL and peak
RSS <= RSS_GOAL x DEFAULT's. The variant kept is the one meeting both at the lower RSS. Only where KEPT
holds may `load(repack="auto")` turn it on for this kind of CPU (runtime/repack_choice.HELD, which
also weighs the first answer: load and prefill; checked against every committed repack.json by
tests/test_repack.py). Writes repack.json and REPACK.md to --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from benchmarks import bundles
from benchmarks.alternate import MIN_ROUNDS, MIN_TOKENS, SPREAD, paired_rates
from benchmarks.backend_runtime import RuntimeBackend
from benchmarks.backends import Case, Spec, say
from benchmarks.tables import gb, num, paired_ratio, table

RESULTS = Path(__file__).parent / "results"
DEFAULT, MAPPED, KEPT, LLAMA = ("ours, plain (mmap)", "ours, repacked + mmap", "ours, repacked, no mmap",
                                "llama.cpp Llama")
CANDIDATES = (MAPPED, KEPT)
SPEED_GOAL = 1.0  # decode, ours / Llama, median of the per-round ratios
RSS_GOAL = 1.05  # peak RSS, / the plain default's
RSS_TOKENS = 16  # tokens of the answer in each peak-RSS process: the KV cache is allocated whole at load
BUSY_CORES = 0.5  # other processes' mean use during the rounds above which the report flags them
CONTEXT = 4096  # the runtime's default context (runtime/model.AUTO_CONTEXT_START): its KV cache is in the RSS


class OursVariant(RuntimeBackend):
    """Ours, as load() opens it, with two changes a user cannot ask for:
    mmap=True forces the mapped file beside repacked weights (repack=True reads without mmap now);
    all_threads=True keeps every thread whatever other programs use (runtime/machine.OthersLoad
    otherwise runs beside them with fewer, while `Llama` keeps spinning its threads: on a shared
    machine the ratio would measure that choice, not the kernels)."""

    def __init__(self, *args, mmap: bool | None = None, all_threads: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.mmap, self.all_threads = mmap, all_threads

    def load(self) -> dict:
        from medgemma_edge.runtime.backends import llama_engine
        from medgemma_edge.runtime.machine import OthersLoad

        plain, mmap = llama_engine.LlamaEngine, self.mmap

        class Mapped(plain):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **{**kwargs, "mmap": mmap})

        class Unseen(OthersLoad):
            def cores(self, *args, **kwargs):
                return None  # threads_beside: all of them

        if mmap is not None:
            llama_engine.LlamaEngine = Mapped
        try:
            out = super().load()
        finally:
            llama_engine.LlamaEngine = plain
        if self.all_threads:
            self.model.others_load = Unseen()
        return out


def specs(bundle: Path, gguf: Path, threads: int) -> list[Spec]:
    ours = {"bundle": str(bundle), "threads": threads, "context": CONTEXT, "open_vision": False}
    return [Spec(DEFAULT, "ours-variant", {**ours, "repack": False}, image=False),
            Spec(MAPPED, "ours-variant", {**ours, "repack": True, "mmap": True}, image=False),
            Spec(KEPT, "ours-variant", {**ours, "repack": True}, image=False),
            Spec(LLAMA, "llama.cpp", {"text_gguf": str(gguf), "threads": threads, "context": CONTEXT}, image=False)]


def default_bundle() -> Path:
    from medgemma_edge.runtime.cache import cache_root

    out = cache_root() / "bench" / "bundles" / "medgemma-4b-shaped-q4_k_m-default"
    if (out / "manifest.json").is_file():
        return out
    from benchmarks.checkpoint4b import build_4b

    return bundles.bundle(build_4b(), "q4_k_m", bundles.DEFAULT, quality="vision")


def judge(data: dict) -> dict:
    """Per candidate: speed and memory against the goal, with the reason in numbers; the kept one."""
    alt, rss = data["decode"] or {}, {n: (r or {}).get("peak_rss_mb") for n, r in data["rss"].items()}
    out, busy = {}, (data.get("others_cores_alternating") or 0) > BUSY_CORES
    for name in CANDIDATES:
        p = paired_rates(alt, name, LLAMA)
        mem = rss[name] / rss[DEFAULT] if rss.get(name) and rss.get(DEFAULT) else None
        speed_ok = None if p is None or busy else p["median"] >= SPEED_GOAL
        rss_ok = None if mem is None else mem <= RSS_GOAL
        why = [f"decode {paired_ratio(p)} Llama, not judged: other processes used "
               f"{data['others_cores_alternating']} cores during the rounds (> {BUSY_CORES})" if p and busy else
               f"decode {paired_ratio(p)} Llama ({'≥' if speed_ok else '<'} {SPEED_GOAL:.2f}×)" if p else
               "decode not measured",
               f"peak RSS {gb(rss[name])} = {mem:.3f}× the plain default's {gb(rss[DEFAULT])} "
               f"({'≤' if rss_ok else '>'} {RSS_GOAL:.2f}×)" if mem else "peak RSS not measured"]
        out[name] = {"speed_vs_llama": p, "vs_default": paired_rates(alt, name, DEFAULT), "rss_vs_default": mem,
                     "speed_ok": speed_ok, "rss_ok": rss_ok, "met": bool(speed_ok and rss_ok), "why": "; ".join(why)}
    met = [n for n in CANDIDATES if out[n]["met"]]
    kept = min(met, key=lambda n: rss[n]) if met else None
    return {"candidates": out, "kept": kept, "auto_on_here": kept == KEPT}


def run(args, argv) -> dict:
    from benchmarks.run import alternating_job, backend_job, machine, run_worker, wait_for_quiet
    from medgemma_edge.runtime.repack_choice import cpu_kind, decide
    from medgemma_edge.runtime.vision_choice import cpu_flags

    t0 = time.perf_counter()
    info = machine()
    flags = cpu_flags()
    info["cpu_kind"] = cpu_kind(flags)
    info["cpu_flags"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
    say(f"[repack] {info['cpu']}, {args.threads} thread(s), load average {info['load_start']:.2f}")
    say(f"[repack] CPU kind {info['cpu_kind']}; flags: {' '.join(info['cpu_flags'])}")
    bundle = args.bundle or default_bundle()
    gguf = bundles.files(bundle)["text"]
    bundles.verified(bundle)
    bundles.warm([gguf])
    todo = specs(bundle, gguf, args.threads)
    case = Case(image="", decode_tokens=args.tokens, text_prompt_words=40, threads=args.threads, context=CONTEXT)
    rss, errors = {}, {}
    with tempfile.TemporaryDirectory(prefix="repack-bench-") as tmp:
        for spec in todo:
            if args.wait_idle:
                wait_for_quiet(args.wait_idle)
            say(f"[repack] {spec.name}: peak RSS in its own process ...")
            res = run_worker(backend_job(spec, replace(case, decode_tokens=RSS_TOKENS), "model"), spec.name, Path(tmp))
            rss[spec.name] = {k: res.get(k) for k in ("peak_rss_mb", "rss_after_load_mb", "load_s", "others_cores")}
            if "error" in res:
                errors[spec.name] = res["error"]
        if args.wait_idle:
            wait_for_quiet(args.wait_idle)
        say(f"[repack] decode, {args.rounds} alternating rounds of {args.tokens} tokens ...")
        res = run_worker(alternating_job(todo, case, args.rounds), "alternating", Path(tmp))
        if "error" in res:
            errors["alternating"] = res["error"]
    info["load_end"] = os.getloadavg()[0]
    data = {"title": "Repacked weights at the default's memory", "command": shlex.join(["python", "-m",
            "benchmarks.bench_repack", *argv]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": info, "threads": args.threads, "bundle": bundle.name, "gguf": gguf.name, "context": CONTEXT,
            "tokens": args.tokens, "rounds": args.rounds, "others_cores_alternating": res.get("others_cores"),
            "goal": {"speed_vs_llama_at_least": SPEED_GOAL, "rss_vs_default_at_most": RSS_GOAL},
            "rss": rss, "decode": res.get("decode"), "errors": errors,
            "auto_with_current_table": dict(zip(("repack", "mmap"), decide("auto", flags=flags)))}
    data["seconds"] = round(time.perf_counter() - t0, 1)
    return data


def _auto_line(data: dict, verdict: dict) -> str:
    """What `load(repack="auto")` does on this run's kind of CPU, and why (runtime/repack_choice.HELD)."""
    from medgemma_edge.runtime.repack_choice import HELD

    kind, rss = data["machine"]["cpu_kind"], data["rss"]
    if verdict["auto_on_here"] and kind in HELD:
        return (f"`load(repack=\"auto\")` repacks without mmap on CPU kind {kind} (runtime/repack_choice.HELD); "
                "other kinds keep the plain mmapped load until a run there says otherwise.")
    if verdict["auto_on_here"]:
        load = [(rss.get(n) or {}).get("load_s") for n in (KEPT, DEFAULT)]
        slower = f"; it loads in {load[0]:.2f} s against {load[1]:.2f} s (the load column)" if all(load) else ""
        ours = verdict["candidates"][KEPT].get("vs_default")
        gain = f": against our own plain load it decodes at {paired_ratio(ours)}" if ours else ""
        return (f"Met on CPU kind {kind}, yet `load(repack=\"auto\")` keeps the plain mmapped load here "
                f"(runtime/repack_choice.HELD says why: the first answer){gain}{slower}.")
    busy = data.get("others_cores_alternating", 0) > BUSY_CORES
    return (f"`load(repack=\"auto\")` keeps the plain mmapped load on CPU kind {kind}"
            + (" until a run on a quiet machine decides the decode clause." if busy else "."))


def report(data: dict) -> str:
    alt, rss, verdict = data["decode"] or {}, data["rss"], data["verdict"]
    m = data["machine"]
    lines = [f"# {data['title']}", "", f"`{data['command']}` — {data['date']}, {data['seconds']:.0f} s", "",
             f"Machine: {m['cpu']}, CPU kind **{m['cpu_kind']}** (flags: {', '.join(m['cpu_flags'])}), "
             f"{data['threads']} threads, load average {m['load_start']:.2f} → {m['load_end']:.2f}; other processes "
             f"used {data['others_cores_alternating']} cores during the alternating rounds.", "",
             f"File: {data['gguf']} (bundle {data['bundle']}), context {data['context']}, text prompt of ~40 words, "
             f"{data['tokens']} greedy tokens, {data['rounds']} alternating rounds after one warm-up each. Peak RSS "
             "(VmHWM): each variant alone in its own process, loading and answering once "
             f"({RSS_TOKENS} tokens). Ours keeps both threads whatever other programs use, as `Llama` does "
             "(a user's runtime would run beside them with fewer).", ""]
    busy = data.get("others_cores_alternating")
    if busy is not None and busy > BUSY_CORES:
        lines += [f"**Busy machine**: other processes used {busy} of {m['logical_cores']} cores during the rounds; "
                  "the per-round ratios are noisier than on a quiet machine.", ""]
    rows = []
    for name in (DEFAULT, MAPPED, KEPT, LLAMA):
        r = rss.get(name) or {}
        rows.append((name, num((alt.get(name) or {}).get("median"), "tok/s"),
                     paired_ratio(paired_rates(alt, name, LLAMA)) if name != LLAMA else "—",
                     paired_ratio(paired_rates(alt, name, DEFAULT)) if name != DEFAULT else "—",
                     gb(r.get("peak_rss_mb")), num(r.get("load_s"), "s")))
    lines += table(("variant", "decode (median)", "/ Llama, per round", "/ ours plain, per round", "peak RSS",
                    "load"), rows)
    lines += ["", f"Ratios: median of the per-round ratios ({SPREAD}: the middle half of the rounds). Per-round "
              "tok/s: " + "; ".join(f"{n}: {', '.join(str(v) for v in (alt.get(n) or {}).get('rounds', []))}"
                                     for n in alt), "", "## Goal", "",
              f"A repacking variant of ours must decode at ≥ {SPEED_GOAL:.2f}× `Llama` (median of the per-round "
              f"ratios) at a peak RSS ≤ {RSS_GOAL:.2f}× our plain default's.", ""]
    for name, c in verdict["candidates"].items():
        status = "met" if c["met"] else "not decided" if c["speed_ok"] is None and c["rss_ok"] is not False else "missed"
        lines.append(f"- **{name}**: {status} — {c['why']}.")
    kept = verdict["kept"]
    lines += ["", f"Kept: **{kept or 'none'}**. " + _auto_line(data, verdict),
        "", "Page cache: mmapped, the file's pages are the page cache's, shared by every process that maps the "
        "same bundle and given back under memory pressure; read without mmap the weights are each process's own "
        "memory, so several processes on one bundle each hold a copy (`--no-repack-weights` shares one).", ""]
    if data["errors"]:
        lines += ["Errors: " + "; ".join(f"{k}: {v}" for k, v in data["errors"].items()), ""]
    return "\n".join(lines)


def write(out: Path, data: dict) -> str:
    from benchmarks.portable import portable

    data = portable({**data, "verdict": judge(data)})
    out.mkdir(parents=True, exist_ok=True)
    (out / "repack.json").write_text(json.dumps(data, indent=2) + "\n")
    md = report(data)
    (out / "REPACK.md").write_text(md)
    return md


def main(argv=None) -> dict:
    from medgemma_edge.runtime.machine import physical_cores

    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=None, help="default: the 4B-shaped q4_k_m bundle")
    p.add_argument("--threads", type=int, default=0, help="threads (0: physical cores)")
    p.add_argument("--rounds", type=int, default=MIN_ROUNDS)
    p.add_argument("--tokens", type=int, default=MIN_TOKENS)
    p.add_argument("--wait-idle", type=float, default=0, metavar="S",
                   help="before each process, wait up to S seconds for other processes to go quiet")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--from", dest="source", type=Path, metavar="REPACK_JSON", help="re-render REPACK.md only")
    args = p.parse_args(argv)
    if args.source:
        data = json.loads(args.source.read_text())
        print(write(args.source.parent, data))
        return data
    args.threads = args.threads or physical_cores()
    data = run(args, argv)
    print(write(args.out, data))
    return data


if __name__ == "__main__":
    main()
