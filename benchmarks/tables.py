"""Markdown formatting shared by the reports (REPORT.md, ONNX_TEXT.md) and the quoted blocks of
README and docs (benchmarks.quotes), so a number reads the same wherever it is shown."""

from __future__ import annotations

from benchmarks.alternate import SPREAD

GB = 1e9
MIB = 1 << 20


def table(header, rows) -> list[str]:
    """A markdown table: header cells, then rows of cells (already formatted)."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def num(v, unit: str = "", digits: int = 2) -> str:
    """`v` with `digits` decimals and its unit; "—" when not measured."""
    if v is None:
        return "—"
    return f"{v:.{digits}f}" + (f" {unit}" if unit else "")


def times(v, digits: int = 2) -> str:
    """A ratio: "1.23×"; "—" when not measured."""
    return "—" if v is None else f"{v:.{digits}f}×"


def gb(mb) -> str:
    """Megabytes (RSS as the workers record it) as "4.42 GB"."""
    return "—" if mb is None else f"{mb * MIB / GB:.2f} GB"


def span(low, high, unit: str = "x") -> str:
    """A range: "0.86–0.91×" for a ratio, "4.1–4.4 GB" else."""
    return f"{low:.2f}–{high:.2f}×" if unit == "x" else f"{low:.2f}–{high:.2f} {unit}"


def spread(p: dict | None, brief: bool = False) -> str:
    """The spread of paired per-round ratios: "IQR 0.86–0.91×, min 0.83, max 0.92, 5 rounds"
    (brief: "IQR 0.86–0.91×, 5 rounds"); "—" without rounds."""
    if not p:
        return "—"
    extremes = "" if brief else f"min {p['min']:.2f}, max {p['max']:.2f}, "
    return f"{SPREAD} {span(p['q1'], p['q3'])}, {extremes}{p['n']} round{'s' if p['n'] != 1 else ''}"


def paired_ratio(p: dict | None, brief: bool = False) -> str:
    """A paired median ratio with its spread: "0.89× (IQR 0.86–0.91×, …)"."""
    return "—" if not p else f"{p['median']:.2f}× ({spread(p, brief)})"
