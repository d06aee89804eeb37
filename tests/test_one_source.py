"""One source for every number: measurements live in benchmarks/results/, not in the code's
comments, docstrings, messages or `--help`; lists the CLI shows are built from their constants.

A measured figure pasted into code drifts from the report the next time the report is run (the
repacked-weights help said +17 % while the report said 1.36x). Code says what a thing does and
points at benchmarks/results/REPORT.md or the bench command that measures it.
"""

import io
import re
import tokenize
from pathlib import Path

import click
from click.testing import CliRunner

from medgemma_edge.cli import main

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("runtime", "export", "kernels", "medgemma_edge")
# A number with a unit of time or speed, a percentage, or a speed-up: what a run measures.
# Shapes (896², 256 × 2560, S×S) and sizes worked out by arithmetic are not matched.
MEASURED = re.compile(
    r"(?<![\w.:{])\d+(?:[.,]\d+)?\s?(?:tok/s|ms|µs|s|sec|seconds|min|minutes)\b"
    r"|\d\s?(?:%|percent\b)"
    r"|\d(?:\.\d+)?\s?[×x]\s?(?:faster|slower|speed)"
    r"|\d\.\d+×"
    r"|\+\s?\d+(?:\.\d+)?\s?(?:GB|MB|GiB|MiB)\b")
TEXT_TOKENS = {tokenize.COMMENT, tokenize.STRING} | {getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}


def _pasted_numbers(path: Path) -> list[str]:
    hits = []
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline):
        if tok.type in TEXT_TOKENS:
            hits += [f"{path.relative_to(ROOT)}:{tok.start[0]}: {m.group(0)!r} in {tok.string.strip()[:90]!r}"
                     for m in MEASURED.finditer(tok.string)]
    return hits


def test_the_pattern_catches_what_it_is_for():
    for text in ("+17 %", "+17 percent measured", "decode 10.2 → 11.9 tok/s", "about 3 min", "encode 22.9 s",
                 "~4x faster", "1.36×", "+1.5 GB of memory", "12 vs 35 ms", "14 µs"):
        assert MEASURED.search(text), text
    for text in ("896² views", "256 × 2560 floats", "S×S×3", "{size}x{size}", "85 slices", "2 threads",
                 "{f['role']:10s}", "n_new % REFIT_TOKENS", "(1.07 GB, arithmetic)", "64 x 64 patches"):
        assert not MEASURED.search(text), text


def test_no_measurement_is_pasted_into_the_code():
    hits = [h for d in SOURCE_DIRS for p in sorted((ROOT / d).rglob("*.py")) for h in _pasted_numbers(p)]
    print("\n".join(hits))
    assert not hits, f"{len(hits)} measured figures in code (put them in benchmarks/results/, point there)"


def _help_texts(group: click.Group, ctx: click.Context):
    for name, command in group.commands.items():
        sub = click.Context(command, info_name=name, parent=ctx)
        yield name, command.get_help(sub)
        if isinstance(command, click.Group):
            yield from _help_texts(command, sub)


def test_no_measurement_in_any_help_text():
    ctx = click.Context(main, info_name="medgemma-edge")
    texts = [("medgemma-edge", main.get_help(ctx)), *_help_texts(main, ctx)]
    hits = [f"{name}: {m.group(0)!r}" for name, text in texts for m in MEASURED.finditer(" ".join(text.split()))]
    print(f"{len(texts)} help texts;", hits)
    assert len(texts) > 5 and not hits


def test_export_help_names_every_quantization():
    """Each option's own words (not only click's [a|b|c] list) name every choice and the default."""
    from medgemma_edge.export.quants import (DEFAULT_TEXT_QUANT, DEFAULT_VISION_QUANTS, ONNX_TEXT_QUANTS,
                                             TEXT_QUANTS, VISION_QUANTS)

    helps = {p.name: p.help for p in main.commands["export"].params if isinstance(p, click.Option)}
    named = lambda text: set(re.findall(r"[\w-]+", text))
    missing = {"quant": set(TEXT_QUANTS + ONNX_TEXT_QUANTS) - named(helps["quant"]),
               "vision_quant": set(VISION_QUANTS) - named(helps["vision_quant"])}
    print(helps["quant"], helps["vision_quant"], missing, sep="\n")
    assert not missing["quant"] and not missing["vision_quant"]
    assert all(f"(default {q})" in helps["quant"] for q in DEFAULT_TEXT_QUANT.values())
    assert " ".join(DEFAULT_VISION_QUANTS) in helps["vision_quant"]
    assert CliRunner().invoke(main, ["export", "--help"]).exit_code == 0
