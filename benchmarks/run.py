"""`make bench`: our runtime against the tools users would pick instead, at MedGemma-4B size.

    python -m benchmarks.run            # 4B-shaped random checkpoint: ~20-30 min once its files exist
                                        # (first time: +~20 min and ~17 GB of cache, ~25 GB while exporting)
    python -m benchmarks.run --quick    # the tiny test model (~1-2 min): checks the harness
    python -m benchmarks.run --threads 1 --wait-idle 60   # on a machine shared with other work

Steps: build (or reuse) the checkpoint and its bundles (q4_k_m and q8_0 text, f16 vision) with
our exporter; write test inputs; measure the machine's roofline; then run every backend of
`specs()` in a fresh process each (preprocessing and model in separate processes, so peak RSS
is the model's own); write results.json, REPORT.md and chart.png to --out (the 4B report to
benchmarks/results/, quick runs to the cache).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks import bundles, focused, goals, report, roofline
from benchmarks.alternate import MIN_ROUNDS, MIN_TOKENS
from benchmarks.backends import Case, Spec, say
from benchmarks.inputs import write_inputs
from medgemma_edge.runtime.cache import cache_root
from medgemma_edge.runtime.vision_choice import NEEDS, cpu_flags, runs_here

RESULTS = Path(__file__).parent / "results"
FP32_WORKING_BYTES = 1.5e9  # transformers fp32: 4 bytes per parameter plus activations (4096-patch attention)


def machine() -> dict:
    import psutil

    cpu = platform.processor() or platform.machine()
    flags = []
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name"))
        have = set(next(ln for ln in info.splitlines() if ln.startswith("flags")).split())
        flags = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_int8")
                 if f in have]
    except (OSError, StopIteration):
        pass
    versions = {}
    for mod in ("llama_cpp", "torch", "transformers", "numpy", "PIL", "pydicom"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            pass
    return {"cpu": cpu, "simd": flags, "physical_cores": psutil.cpu_count(logical=False),
            "logical_cores": psutil.cpu_count(), "ram_gb": psutil.virtual_memory().total / 1e9,
            "os": platform.platform(), "python": platform.python_version(), "versions": versions,
            "load_start": os.getloadavg()[0]}


OURS = "ours q4_k_m"  # the default bundle, vision "auto": what a user gets
PREPARED = "ours q4_k_m, pre-encoded study"
REPACKED = "ours q4_k_m, repacked weights"
TEXT_Q4 = "ours q4_k_m, text only"


def vision_path_name(quant: str) -> str:
    return f"ours q4_k_m, vision {quant}"


def specs(ckpt: Path, q4: Path, q8: Path, threads: int, cache_dir: Path) -> list[Spec]:
    """The report's entries. Another backend = one more Spec (and its class in benchmarks.backends).
    q4: the default export (q4_k_m text + every default vision file); each vision path of it runs
    once more on its own (skipped where it is the one "auto" chose), for its encode time and memory."""
    f4, f8 = bundles.files(q4), bundles.files(q8)
    t = {"threads": threads}
    ours = {"bundle": str(q4), **t}
    paths = [Spec(vision_path_name(vq), "ours", {**ours, "vision": vq}, image=True) for vq in bundles.vision_quants(q4)]
    return [
        Spec("decode only (floor)", "floor", preprocess=True, model=False),
        Spec(OURS, "ours", ours, image=True, preprocess=True),
        Spec(PREPARED, "ours", {**ours, "image_cache_dir": str(cache_dir), "prepare": True}, image=True),
        *paths,
        Spec("llama.cpp q4_k_m", "llama.cpp", {"text_gguf": str(f4["text"]), "mmproj": str(f4["vision"]), **t},
             image=True, preprocess=True),
        Spec(TEXT_Q4, "ours", {**ours, "open_vision": False}, image=False),
        Spec(REPACKED, "ours", {**ours, "repack": True, "open_vision": False}, image=False),
        Spec("ours q8_0", "ours", {"bundle": str(q8), "open_vision": False, **t}, image=False),
        Spec("llama.cpp q8_0", "llama.cpp", {"text_gguf": str(f8["text"]), **t}, image=False),
        Spec("transformers fp32", "transformers", {"checkpoint": str(ckpt), "dtype": "float32", **t},
             image=True, preprocess=True),
        Spec("transformers bf16", "transformers", {"checkpoint": str(ckpt), "dtype": "bfloat16", **t}, image=False),
    ]


def run_worker(job: dict, label: str, tmp: Path) -> dict:
    """Run one worker job (see benchmarks.worker) in a fresh process; its result, or the error."""
    path, out = tmp / f"job-{job['phase']}.json", tmp / f"result-{job['phase']}.json"
    out.unlink(missing_ok=True)
    path.write_text(json.dumps(job))
    t0, busy0, own0 = time.perf_counter(), _busy_cpu_s(), _children_cpu_s()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.worker", str(path), str(out)])
    wall = time.perf_counter() - t0
    others = max(0.0, (_busy_cpu_s() - busy0) - (_children_cpu_s() - own0)) / wall
    if not out.is_file():  # killed (e.g. out of memory) before it could write
        return {"error": f"worker exited with code {proc.returncode} and no result (out of memory?)"}
    say(f"  [{label}] {job['phase']} phase took {wall:.0f} s; other processes used {others:.2f} cores meanwhile")
    return {**json.loads(out.read_text()), "others_cores": round(others, 2)}


def wait_for_quiet(max_s: float, threshold: float = 0.3, window_s: float = 5.0) -> float:
    """Wait (up to max_s) until other processes use less than `threshold` cores; returns the last
    measured load. On a shared machine the backends' numbers are only comparable when quiet."""
    deadline = time.perf_counter() + max_s
    while True:
        b0 = _busy_cpu_s()
        time.sleep(window_s)
        load = (_busy_cpu_s() - b0) / window_s
        if load < threshold or time.perf_counter() >= deadline:
            return load
        say(f"[bench] other processes use {load:.2f} cores; waiting for a quieter machine "
            f"({deadline - time.perf_counter():.0f} s left) ...")


def _busy_cpu_s() -> float:
    """CPU seconds spent on anything but idle, machine-wide."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _children_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def backend_job(spec: Spec, case: Case, phase: str, inputs=(), repeat: int = 0) -> dict:
    return {"spec": spec.to_dict(), "case": asdict(case), "phase": phase,
            "inputs": [[k, str(p)] for k, p in inputs], "repeat": repeat}


def decode_case(case: Case, **changes) -> Case:
    """`case` for a decode comparison: at least MIN_TOKENS tokens a round (benchmarks.alternate)."""
    return Case(**{**asdict(case), "decode_tokens": max(case.decode_tokens, MIN_TOKENS), **changes})


def alternating_job(pair: list[Spec], case: Case, rounds: int) -> dict:
    """Decode of `pair` in one process, alternating rounds: the fair way to compare engines on a
    machine whose load changes (the per-backend runs give each a different moment)."""
    text_case = decode_case(case, text_prompt_words=40)
    drop = ("mmproj", "image_cache_dir", "prepare", "vision")
    specs = [Spec(s.name, s.kind, {**{k: v for k, v in s.options.items() if k not in drop},
                                   **({"open_vision": False} if s.kind == "ours" else {})}, image=False)
             for s in pair]
    return {"specs": [s.to_dict() for s in specs], "case": asdict(text_case), "phase": "alternating",
            "repeat": rounds}


def fp32_fits(ckpt: Path) -> tuple[bool, str]:
    import psutil

    index = ckpt / "model.safetensors.index.json"
    stored = (json.loads(index.read_text())["metadata"]["total_size"] if index.is_file()
              else sum(p.stat().st_size for p in ckpt.glob("*.safetensors")))
    need = stored * 2 + FP32_WORKING_BYTES  # bf16 on disk -> fp32 in memory
    free = psutil.virtual_memory().available
    return free > need, f"needs ~{need / 1e9:.1f} GB, {free / 1e9:.1f} GB available"


def _files_of(spec: Spec) -> list[Path]:
    """The model files a backend will read, so they can be pre-read into the page cache."""
    paths = [Path(v) for k, v in spec.options.items() if k in ("text_gguf", "mmproj")]
    if "bundle" in spec.options:
        paths += bundles.model_files(Path(spec.options["bundle"]))
    return paths


def run_backends(todo: list[Spec], case: Case, inputs, args, ckpt: Path, names: dict, tmp: Path) -> dict:
    """Every backend in its own processes: preprocessing (if asked), then the model phase."""
    out = {"results": {}, "preprocess": {}, "errors": {}}
    flags = cpu_flags()
    for i, spec in enumerate(todo, 1):
        say(f"[bench] ({i}/{len(todo)}) {spec.name}")
        if spec.kind == "transformers" and spec.options.get("dtype") == "float32":
            fits, why = fp32_fits(ckpt)
            if not fits:
                out["errors"][spec.name] = f"skipped: not enough memory for fp32 ({why}); bf16 measured in its place"
                say(f"  [{spec.name}] {out['errors'][spec.name]}")
                spec = Spec("transformers bf16 (image)", spec.kind, {**spec.options, "dtype": "bfloat16"},
                            image=True, preprocess=True)
                names["hf"] = spec.name
        chosen = (out["results"].get(OURS) or {}).get("vision")
        if spec.options.get("vision") and spec.options["vision"] == chosen:
            say(f"  [{spec.name}] skipped: {OURS} ran this vision path ('auto' chose it)")
            continue
        vq = spec.options.get("vision")
        if vq and not runs_here({"quant": vq}, flags):  # the runtime refuses it here (wrong embeddings)
            out["errors"][spec.name] = f"skipped: this vision file needs a CPU with {' or '.join(NEEDS[vq])}"
            say(f"  [{spec.name}] {out['errors'][spec.name]}")
            continue
        if args.wait_idle:
            wait_for_quiet(args.wait_idle)
        bundles.warm(_files_of(spec))
        if "bundle" in spec.options:  # the runtime hashes a bundle's files on its first load only
            bundles.verified(Path(spec.options["bundle"]))
        if spec.options.get("prepare"):
            res = run_worker(backend_job(spec, case, "prepare"), spec.name, tmp)
            if "error" in res:
                out["errors"][f"{spec.name} (prepare)"] = res["error"]
                continue
            out.setdefault("prepare", {})[spec.name] = {**res.get("prepare", {}), "peak_rss_mb": res.get("peak_rss_mb")}
        if spec.preprocess:
            job = backend_job(spec, case, "preprocess", inputs.items(), 2 if args.quick else 5)
            res = run_worker(job, spec.name, tmp)
            out["preprocess"][spec.name] = res.get("preprocess")
            for kind, timing in (res.get("preprocess") or {}).items():  # one input kind that failed
                if timing and "error" in timing:
                    out["errors"][f"{spec.name} (preprocess {kind})"] = timing["error"]
            if "error" in res:
                out["errors"][f"{spec.name} (preprocess)"] = res["error"]
        if spec.model:
            res = out["results"][spec.name] = run_worker(backend_job(spec, case, "model"), spec.name, tmp)
            if "error" in res:
                out["errors"][spec.name] = res["error"]
    return out


def run_alternating(todo: list[Spec], case: Case, args, errors: dict, tmp: Path) -> dict:
    """quant -> decode rates of ours and llama.cpp on the same file, in alternating rounds (q4_k_m:
    also ours with repacked weights)."""
    by_name, out = {s.name: s for s in todo}, {}
    for quant in ("q4_k_m", "q8_0"):
        pair = [by_name.get(f"ours {quant}"), by_name.get(f"llama.cpp {quant}")]
        if None in pair:
            continue
        if quant == "q4_k_m" and REPACKED in by_name:
            pair.insert(1, by_name[REPACKED])
        if args.wait_idle:
            wait_for_quiet(args.wait_idle)
        say(f"[bench] decode, ours vs llama.cpp on the {quant} file, alternating rounds ...")
        res = run_worker(alternating_job(pair, case, MIN_ROUNDS), f"alternating {quant}", tmp)
        out[quant] = res.get("decode")
        if "error" in res:
            errors[f"alternating {quant}"] = res["error"]
    return out


def run_busy(todo: list[Spec], case: Case, args, errors: dict, tmp: Path) -> dict | None:
    """Decode of the default bundle quiet and beside one busy process (benchmarks.bench_busy)."""
    spec = next((s for s in todo if s.name == TEXT_Q4), None)
    if spec is None:
        return None
    if args.wait_idle:
        wait_for_quiet(args.wait_idle)
    say("[bench] decode beside one busy process (quiet vs busy; all threads vs the runtime's choice) ...")
    res = run_worker(backend_job(spec, decode_case(case), "busy", repeat=MIN_ROUNDS), "busy machine", tmp)
    if "error" in res:
        errors["busy machine"] = res["error"]
    return res.get("busy")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny test model instead of the 4B shape")
    p.add_argument("--out", type=Path, help="report folder (default: benchmarks/results, or the cache for --quick)")
    p.add_argument("--threads", type=int, default=0, help="threads per backend (0: physical cores)")
    p.add_argument("--decode-tokens", type=int, default=16,
                   help="tokens per question (decode comparisons decode at least MIN_TOKENS a round)")
    p.add_argument("--only", nargs="*", help="run only the backends whose names contain these words")
    p.add_argument("--focused", nargs="*", choices=sorted(focused.PARTS), default=None,
                   help="focused benchmarks to run after the backends (benchmarks/focused.py; default: all of "
                        "them at the 4B shape, none with --quick; give the flag alone for none)")
    p.add_argument("--note", action="append", default=[], help="a line about this run for the report (repeatable)")
    p.add_argument("--wait-idle", type=float, default=0, metavar="S",
                   help="before each backend, wait up to S seconds for other processes to go quiet")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from medgemma_edge.runtime.machine import physical_cores

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    t_start = time.perf_counter()
    threads = args.threads or physical_cores()
    info = machine()
    say(f"[bench] {info['cpu']}, {info['physical_cores']} cores, {info['ram_gb']:.0f} GB RAM, "
        f"load average {info['load_start']:.2f}; {threads} thread(s) per backend")
    if args.quick:
        from medgemma_edge.testing.models import build_tiny

        ckpt, title = build_tiny(), "quick (tiny test model)"
        out_dir = args.out or cache_root() / "bench" / "results-quick"
    else:
        from benchmarks.checkpoint4b import build_4b

        ckpt, title, out_dir = build_4b(), "MedGemma-4B shape, random weights", args.out or RESULTS
    # q4: the default export (every default vision file, with their measured fidelity, which
    # load(vision="auto") needs); q8: text for the q8_0 decode comparison
    q4, q8 = bundles.bundle(ckpt, "q4_k_m", bundles.DEFAULT, quality="vision"), bundles.bundle(ckpt, "q8_0")
    wanted = lambda name: not args.only or any(w in name for w in args.only)  # noqa: E731
    inputs = write_inputs(cache_root() / "bench" / "inputs", ct_slices=8 if args.quick else 48)
    case = Case(image=str(inputs.png), decode_tokens=args.decode_tokens, text_prompt_words=120, threads=threads)
    cfg = json.loads((ckpt / "config.json").read_text())
    flops = roofline.image_encoder_flops(cfg["vision_config"], cfg["text_config"]["hidden_size"],
                                         cfg.get("mm_tokens_per_image", 256))
    say("[bench] measuring the roofline (memory bandwidth, GEMM) ...")
    roof = roofline.measure_in_process(threads, bundles.files(q4)["text"].stat().st_size, flops, quick=args.quick)
    say(f"[bench] read {roof['bandwidth']['read_gb_s']} GB/s -> decode ceiling {roof['decode_ceiling_tok_s']} "
        f"tok/s; GEMM {roof['gemm']['gflop_s']} GFLOP/s -> encode floor {roof['encode_floor_s']} s")

    names = {"ours": OURS, "prepared": PREPARED, "llama": "llama.cpp q4_k_m", "hf": "transformers fp32",
             "floor": "decode only (floor)", "hf_text": "transformers bf16", "repacked": REPACKED,
             "text_q4": TEXT_Q4, "ours_paths": [OURS] + [vision_path_name(v) for v in bundles.vision_quants(q4)]}
    with tempfile.TemporaryDirectory() as tmp:
        todo = [s for s in specs(ckpt, q4, q8, threads, Path(tmp) / "image-cache") if wanted(s.name)]
        measured = run_backends(todo, case, inputs, args, ckpt, names, Path(tmp))
        alternating = run_alternating(todo, case, args, measured["errors"], Path(tmp))
        busy = run_busy(todo, case, args, measured["errors"], Path(tmp))
    parts = (() if args.quick else tuple(focused.PARTS)) if args.focused is None else args.focused
    focused_codes = focused.run(parts, threads, args.wait_idle, out_dir) if parts else {}
    info["load_end"] = os.getloadavg()[0]
    data = {"title": title, "command": shlex.join(["python", "-m", "benchmarks.run", *argv]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": ckpt.name,
            "model_note": "tiny random test model" if args.quick else "MedGemma 4B config, random bf16 weights",
            "machine": info, "threads": threads, "case": asdict(case), "roofline": roof, **measured,
            "alternating": alternating, "alternating_tokens": decode_case(case).decode_tokens, "busy": busy,
            "run_notes": args.note, "names": names, "focused": focused_codes, "seconds": round(time.perf_counter() - t_start, 1)}
    evaluated = goals.evaluate(data)
    paths = report.write(out_dir, data, evaluated)
    say(f"[bench] done in {data['seconds']:.0f} s; wrote {', '.join(str(p) for p in paths)}")
    print("\n".join(report.goals_table(evaluated)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
