"""README.md and docs/*.md quote the benchmark report through named blocks (benchmarks/quotes.py):
every block must equal its rendering from benchmarks/results/*.json, and name a known block, so a
number in the docs cannot drift from the report. Fix a failure with `python -m benchmarks.quotes --write`."""

import copy
import difflib
import json
import shutil
from pathlib import Path

import pytest

from benchmarks import quotes

REPO = Path(__file__).resolve().parent.parent


def test_every_quoted_block_matches_the_report():
    res = quotes.Results(REPO / quotes.RESULTS)
    stale = []
    for doc in quotes.quoting_files(REPO):
        text = doc.read_text(encoding="utf-8")
        for m in quotes.MARK.finditer(text):
            assert m["name"] in quotes.BLOCKS, f"{doc}: unknown block {m['name']!r} (known: {list(quotes.BLOCKS)})"
            want = quotes.block(m["name"], quotes.render(m["name"], res, doc, REPO))
            if m[0] != want:
                diff = "\n".join(difflib.unified_diff(m[0].splitlines(), want.splitlines(), "in the file",
                                                      "rendered", lineterm="", n=1))
                stale.append(f"{doc.relative_to(REPO)} [{m['name']}]:\n{diff}")
    assert not stale, "stale quotes (python -m benchmarks.quotes --write):\n" + "\n".join(stale)


def test_the_readme_quotes_the_headline():
    names = [m["name"] for m in quotes.MARK.finditer((REPO / "README.md").read_text(encoding="utf-8"))]
    assert "headline" in names, f"README.md quotes {names}; its numbers must come from the report"


@pytest.fixture
def site(tmp_path):
    """A copy of README + docs layout with one block of each kind: stale, unknown, current."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# x\n\n<!-- quote: headline -->\n| old | numbers |\n<!-- /quote -->\n\nend\n")
    (tmp_path / "docs" / "bench.md").write_text("<!-- quote: no-such-block -->\n\n<!-- /quote -->\n"
                                                "`<!-- quote: NAME -->` in prose is no block\n")
    shutil.copytree(REPO / quotes.RESULTS, tmp_path / quotes.RESULTS)
    return tmp_path


def test_check_names_stale_and_unknown_blocks_and_write_fixes_the_stale(site, capsys):
    assert quotes.main(["--check", "--root", str(site)]) == 1
    err = capsys.readouterr().err
    assert "README.md: block 'headline' differs" in err and "unknown block 'no-such-block'" in err, err
    quotes.main(["--write", "--root", str(site)])
    readme = (site / "README.md").read_text()
    assert "| old | numbers |" not in readme and readme.endswith("\n\nend\n"), readme
    assert "](benchmarks/results/REPORT.md)" in readme  # the link from where README lies
    (site / "docs" / "bench.md").write_text("<!-- quote: goals -->\n<!-- /quote -->\n")
    assert quotes.main(["--write", "--root", str(site)]) == 0
    assert "](../benchmarks/results/REPORT.md)" in (site / "docs" / "bench.md").read_text()
    assert quotes.main(["--check", "--root", str(site)]) == 0


def test_a_changed_result_makes_the_quote_stale(site):
    quotes.main(["--write", "--root", str(site)])
    path = site / quotes.RESULTS / "results.json"
    data = json.loads(path.read_text())
    data["results"][data["names"]["ours"]]["load_s"] += 1.0
    path.write_text(json.dumps(data))
    assert quotes.main(["--check", "--root", str(site)]) == 1


def test_every_block_renders_from_results_without_rounds(tmp_path):
    """Older results kept one best rate (no rounds): every block still renders, with "—" for spreads."""
    data = json.loads((REPO / quotes.RESULTS / "results.json").read_text())
    old = copy.deepcopy(data)
    for pair in old["alternating"].values():
        for rates in pair.values():
            rates.pop("rounds", None)
    old["busy"].pop("rounds", None)
    (tmp_path / "results.json").write_text(json.dumps(old))
    shutil.copy(REPO / quotes.RESULTS / "onnx_text.json", tmp_path)
    res = quotes.Results(tmp_path)
    for name in quotes.BLOCKS:
        text = quotes.render(name, res, tmp_path / "README.md", tmp_path)
        assert text.strip(), name
    assert "| q4_k_m |" in quotes.render("decode", res, tmp_path / "README.md", tmp_path)
    assert "—" in quotes.render("decode", res, tmp_path / "README.md", tmp_path)
