"""The README and docs quote the benchmark report; this renders what they quote, from
benchmarks/results/results.json, onnx_text.json, node.json and kv_cache.json, so a number cannot drift from
its report.

    python -m benchmarks.quotes --check   # exit 1 naming every stale or unknown block
    python -m benchmarks.quotes --write   # rewrite every block from the results
    python -m benchmarks.quotes --show headline

A quoted block in README.md or docs/*.md is delimited by two lines,

    <!-- quote: NAME -->

    ... (generated: edit the results or this file, not the block) ...

    <!-- /quote -->

and NAME is one of BLOCKS. tests/test_report_quotes.py fails when a block differs from its
rendering or names no block here.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from functools import cached_property
from pathlib import Path

from benchmarks.alternate import SPREAD, paired_rates
from benchmarks.goals import _get, busy_ratio, counts, median_rate
from benchmarks.tables import GB, MIB, gb, num, paired_ratio, spread, table, times

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path("benchmarks") / "results"  # relative to the repository root
MARK = re.compile(r"^<!-- quote: (?P<name>\S+) -->\n(?P<body>.*?)^<!-- /quote -->$", re.M | re.S)


class Results:
    """The committed results, read once; `link` is the report's path as seen from the quoting file."""

    def __init__(self, folder: Path):
        self.folder = folder

    @cached_property
    def run(self) -> tuple[dict, list]:
        from benchmarks.report import load

        return load(self.folder / "results.json")

    @cached_property
    def onnx(self) -> dict:
        import json

        return json.loads((self.folder / "onnx_text.json").read_text())

    @cached_property
    def kv(self) -> dict | None:
        """benchmarks.bench_kv's kv_cache.json; None until it has been run."""
        from benchmarks.kv_report import read

        return read(self.folder)

    @cached_property
    def node(self) -> dict | None:
        """benchmarks.bench_node's node.json; None until it has been run."""
        import json

        path = self.folder / "node.json"
        return json.loads(path.read_text()) if path.is_file() else None


def _command(data: dict) -> str:
    """The run's command without its --note lines (prose for the report, not needed to rerun it)."""
    cmd = data["command"]
    for note in data.get("run_notes", []):
        for form in (shlex.quote(note), note):
            cmd = cmd.replace(f" --note {form}", "")
    return cmd


def machine(res: Results, link: str) -> list[str]:
    data, _ = res.run
    m = data["machine"]
    return [f"Measured on {m['cpu']} ({', '.join(m.get('simd', []))}), {data.get('threads', '?')} thread(s), "
            f"{data['date']}: `{_command(data)}` ([report]({link}))."]


def headline(res: Results, link: str) -> list[str]:
    data, _ = res.run
    r, names = data["results"], data["names"]
    ours, llama = names["ours"], names["llama"]
    first = lambda name, key: _get(r, name, "first", key)  # noqa: E731
    alt = (data.get("alternating") or {}).get("q4_k_m") or {}
    p = paired_rates(alt, "ours q4_k_m", "llama.cpp q4_k_m")
    vision = _get(r, ours, "vision") or "?"
    prepared = num(first(names.get("prepared"), "ttft_s"), "s")
    rows = [("first question about a pre-encoded study (TTFT, new process)", prepared),
            ("first question about a new image (TTFT, cold)",
             f"{num(first(ours, 'ttft_s'), 's')} (llama.cpp {num(first(llama, 'ttft_s'), 's')})"),
            (f"image encode, fastest faithful path ({vision})",
             f"{num(first(ours, 'image_encode_s'), 's')} (llama.cpp {num(first(llama, 'image_encode_s'), 's')})"),
            ("decode, default bundle (q4_k_m) vs llama.cpp on the same file",
             f"{num(median_rate(alt, 'ours q4_k_m'), 'tok/s')}, {paired_ratio(p, brief=True)} llama.cpp"),
            ("peak RSS, one image", gb(_get(r, ours, "peak_rss_mb"))),
            ("load, bundle -> ready for an image question", num(_get(r, ours, "load_s"), "s"))]
    return [*table((data["title"], "measured"), rows), "",
            f"From [the benchmark report]({link}) ({data['date']}, {data['machine']['cpu']}, "
            f"{data.get('threads', '?')} thread(s)); decode: median of the per-round ratios of alternating rounds, "
            f"{SPREAD} = their interquartile range."]


def goals(res: Results, link: str) -> list[str]:
    from benchmarks.report import goals_table

    _, evaluated = res.run
    return [*goals_table(evaluated), "", f"{counts(evaluated)} ([why]({link}))."]


def vision_encode(res: Results, link: str) -> list[str]:
    data, _ = res.run
    r, names = data["results"], data["names"]
    rows = []
    for name in names.get("ours_paths", []):
        if name not in r or "error" in r[name]:
            continue
        chosen = " (`auto`'s choice)" if name == names["ours"] else ""
        rows.append((f"{_get(r, name, 'vision') or '?'}{chosen}", num(_get(r, name, "first", "image_encode_s"), "s"),
                     num(_get(r, name, "first", "ttft_s"), "s"), gb(_get(r, name, "peak_rss_mb"))))
    return table(("vision file", "image encode", "TTFT, first question", "peak RSS, one image"), rows)


def decode(res: Results, link: str) -> list[str]:
    from benchmarks.report import alternating_rounds

    data, _ = res.run
    alt = data.get("alternating") or {}
    rows = []
    for quant, pair in alt.items():
        ours, theirs = f"ours {quant}", f"llama.cpp {quant}"
        if pair:
            p = paired_rates(pair, ours, theirs)
            rows.append((quant, num(median_rate(pair, ours), "tok/s"), num(median_rate(pair, theirs), "tok/s"),
                         times(p and p["median"]), spread(p)))
    rounds, tokens = alternating_rounds(data)
    out = [*table(("text model", "ours", "llama.cpp", "ours / llama.cpp", "spread"), rows), ""]
    q4, repacked = alt.get("q4_k_m") or {}, data["names"].get("repacked")
    if repacked in q4:
        mem = [_get(data["results"], n, "peak_rss_mb") for n in (repacked, data["names"].get("text_q4"))]
        cost = f"{(mem[0] - mem[1]) * MIB / GB:+.2f} GB" if all(mem) else "—"
        out += [f"Repacked weights (`--repack-weights`, q4_k_m): {num(median_rate(q4, repacked), 'tok/s')}, "
                f"{paired_ratio(paired_rates(q4, repacked, 'ours q4_k_m'))} the default, for {cost} of peak RSS "
                f"(text only: {gb(mem[0])} vs {gb(mem[1])}).", ""]
    return out + [f"Medians of {rounds} alternating rounds of {tokens} tokens in one process, text prompt "
                  f"([report]({link}))."]


def busy(res: Results, link: str) -> list[str]:
    data, _ = res.run
    b = data.get("busy") or {}
    rates, n = b.get("rates") or {}, len(next(iter((b.get("rounds") or {}).values()), ()))
    rows = [(who, *(num(rates.get(f"{cond}, {threads}"), "tok/s") for threads in ("all threads", "runtime's choice")))
            for who, cond in (("quiet", "quiet"), ("beside one busy process", "busy"))]
    over, p = busy_ratio(b, "busy, runtime's choice", "quiet, runtime's choice")
    choice, pc = busy_ratio(b, "busy, runtime's choice", "busy, all threads")
    how = f"medians of {n} alternating rounds" if n else "best of its rounds"
    return [*table(("decode, default bundle", "all threads", "runtime's choice"), rows), "",
            f"Busy / quiet with the runtime's choice: {paired_ratio(p) if p else times(over)}; beside the busy "
            f"process, the runtime's choice / all threads: {paired_ratio(pc) if pc else times(choice)} "
            f"({how}; [report]({link}))."]


def onnx_text(res: Results, link: str) -> list[str]:
    from benchmarks.bench_onnx_text import decode_table, entries_table
    from benchmarks.report import alternating_rounds

    data = res.onnx
    rounds, tokens = alternating_rounds(data)
    report = os.path.join(os.path.dirname(link), "ONNX_TEXT.md")
    return [*entries_table(data), "", *decode_table(data), "",
            f"`{data['command']}`, {data['date']}, {data['machine']['cpu']}, {data['threads']} thread(s); decode: "
            f"{rounds} alternating rounds of {tokens} tokens, medians ([report]({report}))."]


def node(res: Results, link: str) -> list[str]:
    from benchmarks.node_report import goals as node_goals
    from benchmarks.report import goals_table

    data = res.node
    report = os.path.join(os.path.dirname(link), "NODE.md")
    if not data:
        return ["Not measured yet: `python -m benchmarks.bench_node` measures it (4B shape) and writes "
                "benchmarks/results/node.json and NODE.md."]
    return [*goals_table(node_goals(data)), "",
            f"`{data['command']}`, {data['date']}, {data['machine']['cpu']} "
            f"({', '.join(data['machine'].get('simd', []))}) ([report]({report}))."]


def kv_cache(res: Results, link: str) -> list[str]:
    from benchmarks.kv_report import summary_lines

    if not res.kv:
        return ["Not measured yet: `python -m benchmarks.bench_kv` measures it and writes "
                "benchmarks/results/kv_cache.json and KV_CACHE.md."]
    return summary_lines(res.kv, os.path.join(os.path.dirname(link), "KV_CACHE.md"))


BLOCKS = {"machine": machine, "headline": headline, "goals": goals, "vision-encode": vision_encode,
          "decode": decode, "busy": busy, "onnx-text": onnx_text, "node": node, "kv-cache": kv_cache}


def render(name: str, res: Results, doc: Path, root: Path) -> str:
    """Block `name` as it appears in `doc`: links point at the report from where `doc` lies."""
    link = Path(os.path.relpath(root / RESULTS / "REPORT.md", doc.parent)).as_posix()
    return "\n".join(BLOCKS[name](res, link))


def block(name: str, rendered: str) -> str:
    """A block as it stands in a file (blank lines keep a table apart from the marker lines)."""
    return f"<!-- quote: {name} -->\n\n{rendered}\n\n<!-- /quote -->"


def quoting_files(root: Path) -> list[Path]:
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.is_file()]


def problems(text: str, doc: Path, root: Path, res: Results) -> list[str]:
    """Each stale or unknown block of `text` (the content of `doc`), as one line."""
    out = []
    for m in MARK.finditer(text):
        name = m["name"]
        if name not in BLOCKS:
            out.append(f"{doc}: unknown block {name!r} (known: {', '.join(BLOCKS)})")
        elif m[0] != block(name, render(name, res, doc, root)):
            out.append(f"{doc}: block {name!r} differs from the results (python -m benchmarks.quotes --write)")
    return out


def rewrite(text: str, doc: Path, root: Path, res: Results) -> str:
    """`text` with every known block rendered again (unknown ones left for --check to name)."""
    def one(m):
        if m["name"] not in BLOCKS:
            return m[0]
        return block(m["name"], render(m["name"], res, doc, root))
    return MARK.sub(one, text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Render the report blocks README.md and docs/*.md quote.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--check", action="store_true", help="exit 1 naming every stale or unknown block")
    what.add_argument("--write", action="store_true", help="rewrite every block from the results")
    what.add_argument("--show", choices=list(BLOCKS), help="print one block as README.md would quote it")
    p.add_argument("--root", type=Path, default=REPO, help="the folder holding README.md and docs/")
    p.add_argument("--results", type=Path, default=None,
                   help="results folder (default: ROOT/benchmarks/results, else this repository's)")
    args = p.parse_args(argv)
    own = args.root / RESULTS
    res = Results(args.results or (own if (own / "results.json").is_file() else REPO / RESULTS))
    if args.show:
        print(render(args.show, res, args.root / "README.md", args.root))
        return 0
    found = []
    for doc in quoting_files(args.root):
        text = doc.read_text(encoding="utf-8")
        if args.write:
            new = rewrite(text, doc, args.root, res)
            if new != text:
                doc.write_text(new, encoding="utf-8")
                print(f"rewrote {doc}")
        found += problems(doc.read_text(encoding="utf-8"), doc, args.root, res)
    for line in found:
        print(line, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
