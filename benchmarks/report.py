"""One run's results -> results.json, REPORT.md (goal table first) and chart.png.

    python -m benchmarks.report --from benchmarks/results/results.json   # re-render, no rerun

Re-rendering reads results.json, evaluates the goals again with the current rules and writes
REPORT.md and chart.png beside it (results.json is rewritten with the goals' new verdicts and its
paths made portable; its measurements are kept as they are).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks import focused, kv_report
from benchmarks.alternate import MIN_ROUNDS, MIN_TOKENS, SPREAD
from benchmarks.comparisons import context_ratios
from benchmarks.goals import MET, MISSED, NOISE, Goal, counts, evaluate
from benchmarks.inputs import LABELS
from benchmarks.portable import portable
from benchmarks.reasons import missed
from benchmarks.tables import GB, MIB, table

RESULTS = Path(__file__).parent / "results"
STAGES = (  # (label, section, key, format)
    ("import s", None, "import_s", "{:.1f}"),
    ("load s", None, "load_s", "{:.2f}"),
    ("image encode s", "first", "image_encode_s", "{:.2f}"),
    ("prefill tok/s", "first", "prefill_tok_s", "{:.1f}"),
    ("decode tok/s", "first", "decode_tok_s", "{:.2f}"),
    ("TTFT first s", "first", "ttft_s", "{:.2f}"),
    ("TTFT follow-up s", "follow_up", "ttft_s", "{:.2f}"),
    ("peak RSS GB", None, "peak_rss_mb", None),
    ("others' load, cores", None, "others_cores", "{:.2f}"),
)


def alternating_rounds(data: dict) -> tuple[int, int]:
    """(rounds, tokens per round) of the run's decode comparisons, read from its data (older runs
    did not record the tokens: they decoded the case's count)."""
    pairs = [p for p in (data.get("alternating") or {}).values() if p]
    rounds = max((len(v.get("rounds") or ()) for p in pairs for v in p.values()), default=0)
    return rounds, data.get("alternating_tokens") or data["case"]["decode_tokens"]


def too_few_rounds(data: dict) -> str:
    """A sentence when the run's decode comparisons had fewer rounds or tokens than a goal needs."""
    rounds, tokens = alternating_rounds(data)
    if rounds >= MIN_ROUNDS and tokens >= MIN_TOKENS:
        return ""
    return (f" This run has {rounds} rounds of {tokens} tokens, fewer than the {MIN_ROUNDS} rounds of at least "
            f"{MIN_TOKENS} tokens a decode goal needs: rerun it to decide.")


def notes(data: dict) -> list[str]:
    """How the run measured, with this run's own round and token counts."""
    rounds, tokens = alternating_rounds(data)
    busy = data.get("busy") or {}
    busy_rounds = len(next(iter((busy.get("rounds") or {}).values()), ()))
    busy_how = (f"{busy_rounds} alternating rounds (the busy process started for each busy measurement), "
                f"medians; goal on the per-round busy / quiet ratios" if busy_rounds
                else "the best of its rounds each (this run kept no per-round rates)")
    return [
        "Every backend runs in its own fresh process (preprocessing in another one); peak RSS is that process's "
        "VmHWM (mapped model files count as they are touched). Model files are read once before each backend, "
        "so loads are measured with a warm page cache; imports are timed apart from loads.",
        "Same prompt for all: system + one PNG X-ray + a ~60-token question, greedy, fixed number of "
        "decode tokens; the follow-up is a second user turn in the same conversation.",
        f"decode vs llama.cpp goals: both engines in one process on the same GGUF, text prompt, {rounds} alternating "
        f"rounds of {tokens} tokens (a warm-up round first); each round's ratio ours / llama.cpp pairs two runs "
        f"that shared the machine's state; the goal is called on the median ratio and its {SPREAD} (interquartile "
        "range of the per-round ratios): met when the whole range clears the target, missed when it all falls "
        "short, within noise otherwise." + too_few_rounds(data),
        "ours: numbers are the runtime's own Reply.stats; 'load' includes opening the vision file and is the "
        "usual load, not the first after an export (which hashes every file once and remembers it). `ours q4_k_m` "
        "is the default export (q4_k_m text + every default vision file with its measured fidelity) loaded "
        "with vision='auto', as a user gets it; each other vision file of it runs once more on its own "
        "(`ours q4_k_m, vision X`) for its encode time and memory.",
        "pre-encoded study: `Model.prepare` (what `medgemma-edge encode` runs) in one process, with a disk "
        "image cache; the first question about the study in a new process reads it (no image encode, the "
        "saved prefix restored).",
        "busy machine: benchmarks.bench_busy on the default bundle: decode quiet and beside one other process "
        f"spinning on a core, with all threads and with the runtime's own choice; {busy_how}.",
        "repacked weights: `load(repack=True)` (`--repack-weights`), decode in the q4_k_m alternating rounds "
        "with ours and llama.cpp; its text-only memory in the stages table.",
        "llama.cpp direct: llama-cpp-python `Llama` + `MTMDChatHandler` (its defaults: flash attention off, "
        "vision warm-up on) on the same GGUF files; TTFT is wall clock to the first streamed chunk, decode from "
        "chunk times; image encode from mtmd's own log line ('image slice encoded in N ms'), prefill from "
        "llama_perf_context's prompt eval minus that encode (its clock runs across the encode). Its handler "
        "clears the cache and re-encodes the image on every call, follow-ups included. Its q8_0 entry has no "
        "handler (text only).",
        "transformers: Gemma3ForConditionalGeneration on the same random checkpoint, CPU, greedy with KV cache; "
        "encode = get_image_features; HF preprocessing = load_image + the checkpoint's Gemma3ImageProcessor "
        "(DICOM: pydicom + the notebook's windowing, then the same processor).",
        "ours preprocessing = runtime.sources.load_pictures + runtime.preprocess.model_view (default fit: pad) "
        "-> uint8 (N, 896, 896, 3) views: what Model runs; normalization is the vision backend's step. Its times "
        "against the file decode alone are information, not goals.",
        "The weights are random: answers mean nothing, speed and memory are those of the real shapes.",
        "Roofline: bandwidth and GEMM measured with numpy in a fresh process limited to the backends' thread "
        "count, at the start of the run; on a shared machine they move with the other load as much as the "
        "backends do.",
        *data.get("run_notes", []),
    ]


def _cell(result: dict, section, key, fmt) -> str:
    if "error" in result:
        return "error"
    node = result.get(section) if section else result
    if section == "first" and node is None:
        if key == "image_encode_s":
            return "—"
        node = result.get("text")  # text-only entries: prefill, decode and TTFT live there
    value = (node or {}).get(key)
    if value is None:
        return "—"
    return f"{value * MIB / GB:.2f}" if key == "peak_rss_mb" else fmt.format(value)


def goals_table(goals: list[Goal]) -> list[str]:
    return table(("goal", "ours", "anchor", "ratio / value", "spread", "target", "result"),
                 [(g.name, g.ours, g.anchor or "—", g.shown(g.value), g.spread_text(), g.target_text(), g.verdict())
                  for g in goals])


def ratio_table(rows) -> list[str]:
    return table(("comparison", "ours", "anchor", "ours better by"), rows)


def stage_table(results: dict) -> list[str]:
    return table(("backend", *(s[0] for s in STAGES)),
                 [(name, *(_cell(res, *s[1:]) for s in STAGES)) for name, res in results.items()])


def preprocess_table(prep: dict) -> list[str]:
    rows = []
    for name, per in prep.items():
        cells = []
        for k in LABELS:
            t = (per or {}).get(k)
            if not t or "error" in t:
                cells.append("n/a" if not t else f"error: {t['error']}")
            else:
                cells.append(f"{t['best_ms']:.1f} ms (median {t['median_ms']:.1f})")
        rows.append((name, *cells))
    return table(("backend", *LABELS.values()), rows)


def machine_lines(m: dict) -> list[str]:
    return [f"- CPU: {m['cpu']} — {m['physical_cores']} physical / {m['logical_cores']} logical cores, "
            f"flags {', '.join(m['simd'])}",
            f"- RAM: {m['ram_gb']:.1f} GB; OS {m['os']}; Python {m['python']}",
            f"- libraries: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}",
            f"- load average (1 min) at start {m['load_start']:.2f}, at end {m.get('load_end', float('nan')):.2f} "
            "(other work on the machine slows every backend alike, but not always equally)"]


def roofline_lines(r: dict) -> list[str]:
    bw, gemm = r["bandwidth"], r["gemm"]
    return [f"- memory read bandwidth {bw['read_gb_s']} GB/s ({bw['threads']} thread(s); copy {bw['copy_gb_s']} GB/s); "
            f"text GGUF {r['text_gguf_bytes'] / GB:.2f} GB per token -> "
            f"**decode ceiling {r['decode_ceiling_tok_s']} tok/s**",
            f"- float32 GEMM {gemm['gflop_s']} GFLOP/s (numpy, {gemm['n']}³); image encoder {r['encode_gflop']} GFLOP "
            f"per image -> **encode floor {r['encode_floor_s']} s**"]


def kv_lines(kv: dict | None) -> list[str]:
    """The KV cache section: benchmarks/bench_kv.py's own run (kv_cache.json beside results.json)."""
    from benchmarks.kv_report import summary_lines

    if not kv:
        return ["Not measured yet: `python -m benchmarks.bench_kv` writes kv_cache.json and KV_CACHE.md here."]
    return ["f16 (llama.cpp's default, flash attention off) against q8_0 (flash attention on), measured by "
            "`benchmarks/bench_kv.py` in a run of its own:", "", *summary_lines(kv, "KV_CACHE.md")]


def markdown(data: dict, goals: list[Goal], kv: dict | None = None, focused: list[str] | None = None,
             others: list[str] | None = None) -> str:
    out = [f"# Benchmark: {data['title']}", "",
           f"One run of `{data['command']}` on {data['date']}, model `{data['model']}` "
           f"({data['model_note']}), {data.get('threads', '?')} thread(s) per backend, "
           f"{data['seconds'] / 60:.0f} min. {counts(goals)}.", "",
           "## Goals (ratios against anchors measured in the same run)", "", *goals_table(goals), "",
           *(["## Why goals were missed or are within noise (measured in this run)", "", *missed(goals, data), ""]
             if any(g.status in (MISSED, NOISE) for g in goals) else []),
           "## Other comparisons (no goal set)", "", *ratio_table(context_ratios(data)), "",
           "## KV cache precision (--kv-cache)", "", *kv_lines(kv), "",
           *(["## Focused benchmarks (each in a run of its own, benchmarks/focused.py)", "", *focused, ""]
             if focused else []),
           *(["## The same report on other kinds of CPU", "", *others, ""] if others else []),
           "## Stages per backend", "", *stage_table(data["results"]), "",
           "Text-only entries (no image) show their text prompt's prefill, decode and TTFT. *others' load*: "
           "CPU cores that other processes on the machine used, on average, while that backend ran; above "
           "~0.2 its numbers are slowed by them (llama.cpp's spinning threads suffer most).", "",
           "## Preprocessing (file -> model input tensor, best of the repeats)", "",
           *preprocess_table(data["preprocess"]), "",
           "## Roofline", "", *roofline_lines(data["roofline"]), "",
           "## Machine", "", *machine_lines(data["machine"]), "",
           "## How it was measured", "", *[f"- {n}" for n in notes(data)], ""]
    if data.get("errors"):
        out += ["## Errors", "", *[f"- {k}: {v}" for k, v in data["errors"].items()], ""]
    return "\n".join(out)


def chart(path: Path, goals: list[Goal], data: dict) -> bool:
    """Goal scores (>= 1 clears the target) and median decode rates against the ceiling. False when
    matplotlib is missing."""
    try:
        import matplotlib
        import matplotlib.ticker
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    scored = [g for g in goals if g.score() is not None]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 0.45 * max(len(scored), 8) + 1.5),
                                   gridspec_kw={"width_ratios": [3, 2]})
    y = range(len(scored))
    scores = [g.score() for g in scored]
    colors = {MET: "#3a8f4b", MISSED: "#c0392b", NOISE: "#d4a017"}
    ax1.barh(list(y), scores, color=[colors.get(g.status, "#888888") for g in scored])
    ax1.axvline(1.0, color="black", lw=1)
    ax1.set_yticks(list(y), [g.name for g in scored], fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xscale("log")
    ax1.set_xticks([t for t in (0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 3, 5, 10, 20, 50, 100)
                    if min(scores) / 1.5 <= t <= max(scores) * 1.5])
    ax1.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax1.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax1.set_xlabel(f"measured / goal (log scale; green met, red missed, amber: target inside the {SPREAD})")
    ax1.set_title("Goals")
    median = {n: v.get("median") for pair in (data.get("alternating") or {}).values() for n, v in (pair or {}).items()}
    rates = [(n, median.get(n) or (r.get("first") or r.get("text") or {}).get("decode_tok_s"))
             for n, r in data["results"].items()]
    rates = [(n, v) for n, v in rates if v]
    ax2.barh([n for n, _ in rates], [v for _, v in rates], color="#2e6da4")
    ceiling = data["roofline"].get("decode_ceiling_tok_s")
    if ceiling:
        ax2.axvline(ceiling, color="#c0392b", ls="--", label=f"q4_k_m ceiling {ceiling} tok/s")
        ax2.legend(fontsize=8, loc="lower right")
    ax2.invert_yaxis()
    ax2.tick_params(axis="y", labelsize=8)
    ax2.set_xlabel("decode tok/s\n(median of the alternating rounds where run)")
    ax2.set_title("Decode")
    fig.suptitle(data["title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def load(results_json: Path) -> tuple[dict, list[Goal]]:
    """A results.json and its goals evaluated with the current rules."""
    data = json.loads(Path(results_json).read_text())
    data.pop("goals", None)
    data.pop("notes", None)  # older files kept the rendered notes; they are rendered from the data now
    return data, evaluate(data)


def write(out_dir: Path, data: dict, goals: list[Goal]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = portable({**data, "goals": [g.record() for g in goals]})
    paths = [out_dir / "results.json", out_dir / "REPORT.md"]
    paths[0].write_text(json.dumps(data, indent=2) + "\n")
    paths[1].write_text(markdown(data, goals, kv_report.read(out_dir), focused.lines(out_dir),
                                  focused.other_runs(out_dir)))
    if chart(out_dir / "chart.png", goals, data):
        paths.append(out_dir / "chart.png")
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Re-render REPORT.md and chart.png from a results.json (no rerun).")
    p.add_argument("--from", dest="source", type=Path, default=RESULTS / "results.json", metavar="RESULTS_JSON")
    args = p.parse_args(argv)
    data, goals = load(args.source)
    for path in write(args.source.parent, data, goals):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
