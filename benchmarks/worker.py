"""One backend, one phase, in a fresh process, so that its peak RSS and its caches are its own.

    python -m benchmarks.worker JOB.json RESULT.json

JOB holds {"spec": Spec, "case": Case, "phase": "preprocess" | "model" | "prepare" | "busy",
"inputs": [[kind, path]], "repeat": n}, or {"specs": [Spec, ...], "phase": "alternating", "case",
"repeat"} for the decode comparison in alternating rounds. "prepare" pre-encodes the study into the
spec's image cache (the model phase that follows, in a new process, asks about it); "busy" is
benchmarks.bench_busy on the spec's bundle (decode quiet vs beside one busy process). Progress goes
to stderr; the result (or the error) to RESULT.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import traceback

from benchmarks.alternate import alternate
from benchmarks.backends import Case, Spec, build, say
from medgemma_edge.runtime.memory import peak_rss_mb


def _time_best(fn, repeat: int) -> dict:
    fn()  # warm-up: imports, first-touch allocations, thread pools
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"best_ms": round(min(times) * 1e3, 2), "median_ms": round(statistics.median(times) * 1e3, 2),
            "repeat": repeat}


def run_preprocess(spec: Spec, backend, inputs, repeat: int) -> dict:
    out = {}
    backend.imports()
    if backend.needs_load_to_preprocess:
        backend.load()
    for kind, path in inputs:
        fn = backend.preprocess(kind, path)
        if fn is None:
            out[kind] = None
            continue
        say(f"  [{spec.name}] preprocessing {kind} x{repeat + 1} ...")
        try:
            out[kind] = _time_best(fn, repeat)
        except Exception as err:  # one unreadable input must not hide the others' numbers
            out[kind] = {"error": f"{type(err).__name__}: {err}"}
            say(f"  [{spec.name}] preprocessing {kind} failed: {out[kind]['error']}")
            continue
        say(f"  [{spec.name}] preprocessing {kind}: best {out[kind]['best_ms']:.1f} ms")
    return out


def run_model(spec: Spec, backend, case: Case) -> dict:
    t0 = time.perf_counter()
    backend.imports()
    import_s = round(time.perf_counter() - t0, 3)
    say(f"  [{spec.name}] imports took {import_s:.1f} s; loading ...")
    t0 = time.perf_counter()
    extra = backend.load() or {}
    out = {"load_s": round(time.perf_counter() - t0, 3), "import_s": import_s, **extra,
           "rss_after_load_mb": peak_rss_mb()}
    say(f"  [{spec.name}] loaded in {out['load_s']:.2f} s")
    if spec.image:
        say(f"  [{spec.name}] first question with one image ({case.decode_tokens} tokens) ...")
        out["first"] = backend.ask(case)
        say(f"  [{spec.name}] first: {_brief(out['first'])}")
        say(f"  [{spec.name}] follow-up question on the same image ...")
        out["follow_up"] = backend.follow_up(case)
        if out["follow_up"]:
            say(f"  [{spec.name}] follow-up: {_brief(out['follow_up'])}")
    else:
        say(f"  [{spec.name}] text-only prompt ({case.decode_tokens} tokens) ...")
        out["text"] = backend.text_only(case)
        say(f"  [{spec.name}] text: {_brief(out['text'])}")
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def run_alternating(specs: list[Spec], case: Case, rounds: int) -> dict:
    """Text-only decode of several backends in one process, in alternating rounds
    (benchmarks.alternate), so that other work on the machine hits all of them alike."""
    backends = [build(s) for s in specs]
    for b in backends:
        b.imports()
        b.load()
    runs = {spec.name: (lambda b=b: b.text_only(case)["decode_tok_s"]) for spec, b in zip(specs, backends)}
    try:
        return alternate(runs, rounds)
    finally:
        for b in backends:
            b.close()


def _brief(stats: dict) -> str:
    keys = ("ttft_s", "image_encode_s", "prefill_tok_s", "decode_tok_s", "prompt_tokens", "reused_tokens")
    return ", ".join(f"{k} {stats[k]}" for k in keys if stats.get(k) is not None)


def main(job_path: str, result_path: str) -> int:
    job = json.loads(open(job_path).read())
    case = Case(**job["case"])
    result = {"phase": job["phase"]}
    try:
        if job["phase"] == "alternating":
            result["specs"] = job["specs"]
            result["decode"] = run_alternating([Spec(**s) for s in job["specs"]], case, job["repeat"])
        else:
            spec = Spec(**job["spec"])
            result["spec"] = spec.to_dict()
            backend = build(spec)
            if job["phase"] == "preprocess":
                result["preprocess"] = run_preprocess(spec, backend, job["inputs"], job["repeat"])
            elif job["phase"] in ("prepare", "busy"):
                backend.imports()
                backend.load()
                if job["phase"] == "prepare":
                    result["prepare"] = backend.prepare(case)
                else:
                    from benchmarks.bench_busy import measure

                    result["busy"] = measure(backend.model, case.decode_tokens, job["repeat"])
                result["peak_rss_mb"] = peak_rss_mb()
            else:
                result.update(run_model(spec, backend, case))
            backend.close()
        code = 0
    except Exception as err:  # the report records it and goes on with the next backend
        traceback.print_exc()
        result["error"] = f"{type(err).__name__}: {err}"
        code = 1
    with open(result_path, "w") as fh:
        json.dump(result, fh, indent=2)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
