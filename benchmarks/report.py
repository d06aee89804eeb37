"""One run's results -> results.json, REPORT.md (ratio table first) and chart.png."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.goals import GB, MIB, Goal, context_ratios
from benchmarks.inputs import LABELS
from benchmarks.reasons import missed

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


# What every report says about how it was measured (run.py adds the run's own notes).
NOTES = [
    "Every backend runs in its own fresh process (preprocessing in another one); peak RSS is that process's "
    "VmHWM (mapped model files count as they are touched). Model files are read once before each backend, "
    "so loads are measured with a warm page cache; imports are timed apart from loads.",
    "Same prompt for all: system + one PNG X-ray + a ~60-token question, greedy, fixed number of "
    "decode tokens; the follow-up is a second user turn in the same conversation.",
    "decode vs llama.cpp goals: both engines in one process on the same GGUF, text prompt, alternating "
    "rounds, best round each (the machine's load drifts between the per-backend processes).",
    "ours: numbers are the runtime's own Reply.stats; 'load' includes opening the vision file and is the "
    "usual load, not the first after an export (which hashes every file once and remembers it). `ours q4_k_m` "
    "is the default export (q4_k_m text + every default vision file with its measured fidelity) loaded "
    "with vision='auto', as a user gets it; each other vision file of it runs once more on its own "
    "(`ours q4_k_m, vision X`) for its encode time and memory.",
    "pre-encoded study: `Model.prepare` (what `medgemma-edge encode` runs) in one process, with a disk "
    "image cache; the first question about the study in a new process reads it (no image encode, the "
    "saved prefix restored).",
    "busy machine: benchmarks.bench_busy on the default bundle: decode quiet, then beside one other "
    "process spinning on a core, with all threads and with the runtime's own choice; best of 3 each.",
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
    "-> uint8 (N, 896, 896, 3) views: what Model runs; normalization is the vision backend's step.",
    "The weights are random: answers mean nothing, speed and memory are those of the real shapes.",
    "Roofline: bandwidth and GEMM measured with numpy in a fresh process limited to the backends' thread "
    "count, at the start of the run; on a shared machine they move with the other load as much as the "
    "backends do.",
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
    lines = ["| goal | ours | anchor | ratio / value | target | result |", "|---|---|---|---|---|---|"]
    for g in goals:
        value = "—" if g.value is None else (f"{g.value:.2f}×" if g.unit == "x" else f"{g.value:.2f} {g.unit}")
        target = f"≥ {g.target:g}×" if g.mode == "at_least" else f"≤ {g.target:g} {g.unit}"
        lines.append(f"| {g.name} | {g.ours} | {g.anchor or '—'} | {value} | {target} | {g.verdict()} |")
    return lines


def ratio_table(rows) -> list[str]:
    lines = ["| comparison | ours | anchor | ours better by |", "|---|---|---|---|"]
    return lines + [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]


def stage_table(results: dict) -> list[str]:
    lines = ["| backend | " + " | ".join(s[0] for s in STAGES) + " |", "|---" * (len(STAGES) + 1) + "|"]
    for name, res in results.items():
        lines.append(f"| {name} | " + " | ".join(_cell(res, *s[1:]) for s in STAGES) + " |")
    return lines


def preprocess_table(prep: dict) -> list[str]:
    kinds = list(LABELS)
    lines = ["| backend | " + " | ".join(LABELS[k] for k in kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for name, per in prep.items():
        cells = []
        for k in kinds:
            t = (per or {}).get(k)
            if not t or "error" in t:
                cells.append("n/a" if not t else f"error: {t['error']}")
            else:
                cells.append(f"{t['best_ms']:.1f} ms (median {t['median_ms']:.1f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


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


def markdown(data: dict, goals: list[Goal]) -> str:
    met = sum(1 for g in goals if g.met)
    out = [f"# Benchmark: {data['title']}", "",
           f"One run of `{data['command']}` on {data['date']}, model `{data['model']}` "
           f"({data['model_note']}), {data.get('threads', '?')} thread(s) per backend, "
           f"{data['seconds'] / 60:.0f} min. {met} of {len(goals)} goals met.", "",
           "## Goals (ratios against anchors measured in the same run)", "", *goals_table(goals), "",
           *(["## Why goals were missed (measured in this run)", "", *missed(goals, data), ""]
             if any(g.met is False for g in goals) else []),
           "## Other comparisons (no goal set)", "",
           *ratio_table(context_ratios(data["results"], data["preprocess"], data["roofline"], data["names"],
                                        data.get("alternating"), data.get("busy"))), "",
           "## Stages per backend", "", *stage_table(data["results"]), "",
           "Text-only entries (no image) show their text prompt's prefill, decode and TTFT. *others' load*: "
           "CPU cores that other processes on the machine used, on average, while that backend ran; above "
           "~0.2 its numbers are slowed by them (llama.cpp's spinning threads suffer most).", "",
           "## Preprocessing (file -> model input tensor, best of the repeats)", "",
           *preprocess_table(data["preprocess"]), "",
           "## Roofline", "", *roofline_lines(data["roofline"]), "",
           "## Machine", "", *machine_lines(data["machine"]), "",
           "## How it was measured", "", *[f"- {n}" for n in data["notes"]], ""]
    if data.get("errors"):
        out += ["## Errors", "", *[f"- {k}: {v}" for k, v in data["errors"].items()], ""]
    return "\n".join(out)


def chart(path: Path, goals: list[Goal], data: dict) -> bool:
    """Goal scores (>= 1 met) and decode rates against the ceiling. False when matplotlib is missing."""
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
    ax1.barh(list(y), scores, color=["#3a8f4b" if s >= 1 else "#c0392b" for s in scores])
    ax1.axvline(1.0, color="black", lw=1)
    ax1.set_yticks(list(y), [g.name for g in scored], fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xscale("log")
    ax1.set_xticks([t for t in (0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 3, 5, 10, 20, 50, 100)
                    if min(scores) / 1.5 <= t <= max(scores) * 1.5])
    ax1.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax1.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax1.set_xlabel("measured / goal (≥ 1: met; log scale)")
    ax1.set_title("Goals")
    best = {n: v.get("best") for pair in (data.get("alternating") or {}).values() for n, v in (pair or {}).items()}
    rates = [(n, best.get(n) or (r.get("first") or r.get("text") or {}).get("decode_tok_s"))
             for n, r in data["results"].items()]
    rates = [(n, v) for n, v in rates if v]
    ax2.barh([n for n, _ in rates], [v for _, v in rates], color="#2e6da4")
    ceiling = data["roofline"].get("decode_ceiling_tok_s")
    if ceiling:
        ax2.axvline(ceiling, color="#c0392b", ls="--", label=f"q4_k_m ceiling {ceiling} tok/s")
        ax2.legend(fontsize=8, loc="lower right")
    ax2.invert_yaxis()
    ax2.tick_params(axis="y", labelsize=8)
    ax2.set_xlabel("decode tok/s (ours, llama.cpp: best of alternating rounds)")
    ax2.set_title("Decode")
    fig.suptitle(data["title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def rerender(out_dir: Path) -> list[Path]:
    """REPORT.md and chart.png again from results.json (after a change to the report's format)."""
    from benchmarks.goals import evaluate


    data = json.loads((out_dir / "results.json").read_text())
    data.pop("goals", None)
    data["notes"] = NOTES + data.get("run_notes", [])
    goals = evaluate(data["results"], data["preprocess"], data["roofline"], data["names"], data.get("alternating"),
                     data.get("busy"), data["machine"].get("simd", ()))
    return write(out_dir, data, goals)


def write(out_dir: Path, data: dict, goals: list[Goal]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {**data, "goals": [{**g.__dict__, "met": g.met, "verdict": g.verdict()} for g in goals]}
    paths = [out_dir / "results.json", out_dir / "REPORT.md"]
    paths[0].write_text(json.dumps(data, indent=2) + "\n")
    paths[1].write_text(markdown(data, goals))
    if chart(out_dir / "chart.png", goals, data):
        paths.append(out_dir / "chart.png")
    return paths


if __name__ == "__main__":  # python -m benchmarks.report [DIR]: re-render a report from its results.json
    import sys

    for p in rerender(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results"):
        print(p)
