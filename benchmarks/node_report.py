"""The DICOM node benchmark's goals and report (benchmarks/bench_node.py measures; this reads its
node.json): NODE.md, and what benchmarks/quotes.py's `node` block shows."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.goals import Goal, paired_goal
from benchmarks.portable import portable
from benchmarks.tables import num, paired_ratio, table

RECEIVE_RATIO, TTFT_XRAY_S, TTFT_CT_S = 0.5, 3.0, 10.0  # the goals
CT_SLICES = 24  # the goal's CT series


def goals(data: dict) -> list[Goal]:
    rec = data.get("receive") or {}
    mb = rec.get("mb_s") or {}
    q = data.get("questions") or {}
    out = [paired_goal("receive throughput into the spool / Orthanc, same storescu", RECEIVE_RATIO, rec.get("paired"),
                       ours=num((mb.get("node") or {}).get("median"), "MB/s"),
                       anchor=num((mb.get("orthanc") or {}).get("median"), "MB/s Orthanc"))]
    slices = data.get("ct_slices", CT_SLICES)
    for kind, label, limit in (("xray", "an X-ray study", TTFT_XRAY_S), ("ct", f"a {slices}-slice CT", TTFT_CT_S)):
        r = q.get(kind) or {}
        out.append(Goal(f"TTFT, first question about {label} that arrived while idle", limit, "at_most", unit="s",
                        value=r.get("ttft_s"), ours=num(r.get("ttft_s"), "s"),
                        anchor=f"prepared in the background, ready {num(r.get('ready_after_s'), 's')} after arrival",
                        note="" if r else "not run"))
    return out


def receive_lines(data: dict) -> list[str]:
    rec = data.get("receive")
    if not rec:
        return ["Receive throughput: not measured."]
    mb = rec["mb_s"]
    rows = [(name, num(mb[key]["median"], "MB/s"), ", ".join(f"{v:.1f}" for v in mb[key]["rounds"] if v))
            for name, key in (("node: DicomListener + Spool (fsync each)", "node"), ("Orthanc", "orthanc"))]
    return [*table(("receiver", "median", "per round, MB/s"), rows), "",
            f"{rec['instances']} instances, {rec['bytes'] / 1e6:.1f} MB a send; node / Orthanc "
            f"{paired_ratio(rec['paired'])}; stored {rec['counts']['node']} and {rec['counts']['orthanc']} "
            f"of {rec['expected']} sent."]


def question_lines(data: dict) -> list[str]:
    q = data.get("questions")
    if not q:
        return ["First question: not measured."]
    rows = []
    for kind, label in (("xray", "X-ray (DX 2500×2048)"), ("ct", f"CT, {data.get('ct_slices', CT_SLICES)} slices")):
        r = q.get(kind) or {}
        s = r.get("server") or {}
        rows.append((label, num(r.get("send_s"), "s"), num(r.get("preparing_after_s"), "s"), num(r.get("ready_after_s"), "s"),
                     num(r.get("ttft_s"), "s"), f"{s.get('reused_tokens', '—')} of {s.get('prompt_tokens', '—')}",
                     f"{s.get('images_from_cache', '—')} of {s.get('images', '—')}"))
    return [*table(("study", "send", "preparing after", "ready after", "TTFT (client)", "prompt tokens reused",
                    "images from the cache"), rows), "",
            f"Times after the send's end include --stable-s {data.get('stable_s', '?')} s of waiting for more "
            "instances; the question is asked once the study is ready."]


def report(data: dict) -> str:
    from benchmarks.report import goals_table

    m = data["machine"]
    return "\n".join([f"# The DICOM node ({data['model']})", "",
                      f"`{data['command']}` — {data['date']}, {m['cpu']}, SIMD {' '.join(m.get('simd', []))}, "
                      f"{data.get('threads') or 'default'} threads, {data['seconds']:.0f} s.", "",
                      "## Receive throughput", "", *receive_lines(data), "",
                      "## First question about a study that arrived while idle", "", *question_lines(data), "",
                      "## Goals", "", *goals_table(goals(data))]) + "\n"


def write(out_dir: Path, data: dict) -> str:
    data.update(portable({**data, "goals": [g.record() for g in goals(data)]}))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "node.json").write_text(json.dumps(data, indent=2) + "\n")
    md = report(data)
    (out_dir / "NODE.md").write_text(md)
    return md
