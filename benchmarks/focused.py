"""The focused benchmarks `benchmarks.run` runs after its backends (issue 26), each in a process of
its own writing NAME.json and its Markdown beside results.json, and the section of REPORT.md that
sums them up from those files (a part not run yet says how to run it).

    encoder      benchmarks.bench_encoder      the image encoder toward its compute limit
    repack       benchmarks.bench_repack       repacked decode at the default's memory
    speculative  benchmarks.bench_speculative  guessed tokens checked in batches, forced text
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.backends import say
from benchmarks.goals import MET, MISSED, NOISE

PARTS = {  # name: (module, results json, its Markdown, title)
    "encoder": ("benchmarks.bench_encoder", "encoder.json", "ENCODER.md", "Image encoder toward its compute limit"),
    "repack": ("benchmarks.bench_repack", "repack.json", "REPACK.md", "Repacked decode at the default's memory"),
    "speculative": ("benchmarks.bench_speculative", "speculative.json", "SPECULATIVE.md",
                    "Speculative decoding and forced text"),
}


def run(names, threads: int, wait_idle: float = 0, out: Path | None = None) -> dict[str, int]:
    """Run each named part (its own process, its own progress on stderr), writing its files to `out`
    (default: each part's own, benchmarks/results); name -> exit code."""
    codes = {}
    for name in names:
        module = PARTS[name][0]
        cmd = [sys.executable, "-m", module, "--threads", str(threads)] + (["--out", str(out)] if out else [])
        if wait_idle:
            cmd += ["--wait-idle", str(wait_idle)]
        say(f"[bench] focused part {name}: {' '.join(cmd[1:])}")
        codes[name] = subprocess.run(cmd, check=False).returncode
    return codes


def _kind(data: dict) -> str:
    return data.get("cpu_kind") or (data.get("machine") or {}).get("cpu_kind") or "?"


def _when(data: dict) -> str:
    return f"`{data.get('command', '?')}`, {data.get('when') or data.get('date', '?')}, CPU kind {_kind(data)}"


def _headline(name: str, data: dict) -> str:
    if name == "speculative":
        js = (data.get("real", {}).get("json") or {}).get("gain") or {}
        gain = data.get("gain")
        kind = (data.get("gain_by_kind") or {}).get(data.get("cpu_kind")) or {}
        auto = ", ".join(f"{what} {'on' if (kind.get(key) or 0) > 1 else 'off'}"
                         for what, key in (("free text", "small"), ("JSON", "small_json")))
        return (f"measured gain on real weights {gain:.2f}× (auto on this kind: {auto}); forced text on "
                f"lab-report JSON {js.get('median', 0):.2f}× (goal ≥ 1.5×)") if gain else ""
    if name == "repack":
        from medgemma_edge.runtime.repack_choice import HELD

        kept, kind = (data.get("verdict") or {}).get("kept"), _kind(data)
        auto = f"auto repacks on {kind}" if kind in HELD else f"auto keeps the plain load on {kind} (repack_choice.HELD)"
        return f"goal met by {kept}; {auto}" if kept else "no variant kept (see why in the file)"
    verdict = data.get("verdict") or data.get("goal") or {}
    return verdict.get("summary", "") if isinstance(verdict, dict) else str(verdict)


def lines(folder: Path) -> list[str]:
    out = []
    for name, (module, js, md, title) in PARTS.items():
        path = folder / js
        if not path.exists():
            out.append(f"- **{title}**: not measured yet — `python -m {module}` writes {js} and {md} here.")
            continue
        data = json.loads(path.read_text())
        head = _headline(name, data)
        out.append(f"- **{title}** ([{md}]({md})): {_when(data)}" + (f"; {head}" if head else "") + ".")
    return out


def other_runs(folder: Path) -> list[str]:
    """The same report on other kinds of CPU (issue 26 asks for one run per kind): a run kept in a
    subfolder (`python -m benchmarks.run --out benchmarks/results/avx2`), or, from such a subfolder,
    the run in the folder above it; one line each, its goal counts read from its results.json."""
    here = folder.resolve()
    found = [(f"{p.parent.name}/REPORT.md", p) for p in sorted(here.glob("*/results.json"))]
    if (here.parent / "results.json").is_file():
        found.insert(0, ("../REPORT.md", here.parent / "results.json"))
    out = []
    for link, path in found:
        data = json.loads(path.read_text())
        machine = data.get("machine") or {}
        seen = [g.get("status") for g in data.get("goals") or []]
        tally = ", ".join(f"{seen.count(s)} {s}" for s in dict.fromkeys([MET, NOISE, MISSED, *seen]) if s in seen)
        tally = tally or "none recorded"
        out.append(f"- [{link}]({link}): {machine.get('cpu', '?')} ({', '.join(machine.get('simd') or []) or '?'}), "
                   f"{data.get('date', '?')}; goals: {tally}.")
    return out
