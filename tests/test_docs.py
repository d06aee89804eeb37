"""The documentation's commands and links stay true: README.md and docs/*.md.

Every `medgemma-edge …` line in a fenced sh/bash/console block must name a command that exists and
use only flags that command takes, and its arguments must parse through click's own parser (the
command is never run). In prose, an inline `medgemma-edge …` (or `ask --…`) span must name real
flags too, and a span that starts with a flag (`--vision f16`) one that some command takes (write
another program's flag with its program: `pip install --find-links DIR`). `python -m benchmarks.X` must name a module of benchmarks/, `make X` a Makefile target.
Every docs page is linked from the README, and every relative link (and its #anchor) resolves.
Each failure is printed as file:line.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from unittest import mock

import click
import pytest

from medgemma_edge.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
SHELL_LANGS = {"sh", "bash", "shell", "console"}
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
HEREDOC = re.compile(r"<<-?\s*['\"]?([A-Za-z_]\w*)['\"]?")
ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
SEPARATOR = re.compile(r"[|&;()]+")  # shlex's punctuation tokens that end a simple command
REDIRECT = re.compile(r"\d*[<>]+&?")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


# -- reading markdown ---------------------------------------------------------------------------
def split_fences(text: str):
    """(line number, line, fence language or None outside code blocks) for every line."""
    lang, fence = None, None
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None and m:
            fence, lang = m.group(1), m.group(2).lower()
            yield n, line, "fence"
            continue
        if fence is not None and line.strip().startswith(fence[:3]) and line.strip().strip(fence[0]) == "":
            fence, lang = None, None
            yield n, line, "fence"
            continue
        yield n, line, lang if fence is not None else None


def shell_lines(text: str) -> list[tuple[int, str]]:
    """Command lines of the shell code blocks: continuations joined, heredoc bodies and console
    output left out; the line number is the command's first line."""
    out, pending, start, heredoc = [], "", 0, None
    for n, line, lang in split_fences(text):
        if lang not in SHELL_LANGS:
            pending, heredoc = "", None
            continue
        if heredoc is not None:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        if lang == "console" and not pending:
            if not line.lstrip().startswith("$ "):
                continue  # output, not a command
            line = line.lstrip()[2:]
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full, pending = pending + line, ""
        m = HEREDOC.search(full)
        heredoc = m.group(1) if m else None
        out.append((start, full))
    return out


def prose_spans(text: str) -> list[tuple[int, str]]:
    """Inline code spans outside code blocks (a span may wrap onto the next line)."""
    prose = "\n".join("" if lang is not None else line for _, line, lang in split_fences(text))
    return [(prose.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split())) for m in INLINE.finditer(prose)]


def simple_commands(line: str) -> list[tuple[dict, list[str]]]:
    """(environment prefix, words) of each simple command on a shell line: split at pipes, `&&`,
    `;` and subshells, redirections and comments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:  # an unbalanced quote: read it as plain words
        tokens = line.split("#", 1)[0].split()
    commands, words, skip = [], [], False
    for tok in tokens + [";"]:
        if skip:
            skip = False
        elif SEPARATOR.fullmatch(tok):
            if words:
                commands.append(words)
            words = []
        elif REDIRECT.fullmatch(tok):
            skip = True  # the redirection's target
        else:
            words.append(tok)
    out = []
    for words in commands:
        env = {}
        while words and ENV_ASSIGNMENT.match(words[0]):
            key, value = words.pop(0).split("=", 1)
            env[key] = value
        if words:
            out.append((env, words))
    return out


# -- checking one command -----------------------------------------------------------------------
def option_names(command: click.Command) -> set[str]:
    names = {"-h", "--help"}
    for param in command.params:
        if isinstance(param, click.Option):
            names.update(param.opts, param.secondary_opts)
    return names


def is_flag_token(tok: str) -> bool:
    return tok.startswith("-") and tok != "-" and not re.match(r"-[\d.]", tok)


def cli_problems(args: list[str], env: dict, *, parse: bool = True) -> list[str]:
    """What is wrong with `medgemma-edge ARGS`: an unknown command, a flag it does not take, or
    (with parse) arguments click's parser refuses. Nothing is run."""
    args = [a.strip("[]") if is_flag_token(a.strip("[]")) else a for a in args]  # `[--flag X]` in usage
    if not args:
        return ["no command given"]
    if is_flag_token(args[0]):
        unknown = [a for a in args if is_flag_token(a) and a not in option_names(main) | {"--version"}]
        return [f"medgemma-edge has no option {a}" for a in unknown]
    name, rest = args[0], args[1:]
    command = main.commands.get(name)
    if command is None:
        return [f"no command `{name}` (have: {', '.join(sorted(main.commands))})"]
    known = option_names(command)
    flags = []
    for tok in rest:
        if tok == "--":
            break
        if is_flag_token(tok):
            flags.append(tok.split("=", 1)[0])
    unknown = [f"`{name}` has no option {flag}" for flag in flags if flag not in known]
    if unknown or not parse or {"-h", "--help"} & set(flags):
        return unknown
    # Options read from MEDGEMMA_EDGE_* must come from the line's own prefix, not this shell.
    with mock.patch.dict(os.environ, env):
        for key in [k for k in os.environ if k.startswith("MEDGEMMA_EDGE_") and k not in env]:
            del os.environ[key]
        try:
            command.make_context(f"medgemma-edge {name}", list(rest))
        except click.ClickException as err:
            return [f"`{name}`: {err.format_message()}"]
    return []


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.M)}


def is_cli(word: str) -> bool:
    return word == "medgemma-edge" or word.endswith("/bin/medgemma-edge")


def command_problems(env: dict, words: list[str], *, parse: bool = True) -> list[str]:
    """Problems of one simple command this test knows how to check; [] for any other program."""
    program = Path(words[0]).name
    if is_cli(words[0]):
        return cli_problems(words[1:], env, parse=parse)
    if re.fullmatch(r"python[\d.]*", program) and len(words) > 2 and words[1] == "-m" \
            and words[2].startswith("benchmarks."):
        module = words[2].split(".", 1)[1]
        if "." in module or not ((ROOT / "benchmarks" / f"{module}.py").is_file()
                                 or (ROOT / "benchmarks" / module / "__main__.py").is_file()):
            return [f"no module {words[2]} in benchmarks/"]
        return []
    if program == "make":
        targets = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
        return [f"no Makefile target `{t}`" for t in targets if t not in makefile_targets()]
    return []


def page_command_failures(path: Path, text: str) -> list[str]:
    failures = []
    for n, line in shell_lines(text):
        for env, words in simple_commands(line):
            failures += [f"{where(path, n)}: {p} — {line.strip()}" for p in command_problems(env, words)]
    for n, span in prose_spans(text):
        commands = simple_commands(span)
        if not commands or "…" in span:  # `medgemma-edge …`: a placeholder, not a command
            continue
        words = commands[0][1]
        if is_flag_token(words[0]):  # `--vision f16` in a sentence: some command must take it
            every = set().union(*(option_names(c) for c in main.commands.values()))
            failures += [f"{where(path, n)}: no command has option {w.split('=', 1)[0]} — `{span}`"
                         for w in words if is_flag_token(w) and w.split("=", 1)[0] not in every]
            continue
        if words[0] in main.commands and any(is_flag_token(w) for w in words[1:]):
            words = ["medgemma-edge", *words]  # `ask --stats` in a sentence
        if len(words) > 1 and (is_cli(words[0]) or words[0] == "make" or words[0].startswith("python")):
            # Prose shows fragments (`ask -m BASE --lora FILE`): flags only, no full parse.
            failures += [f"{where(path, n)}: {p} — `{span}`" for p in command_problems({}, words, parse=False)]
    return failures


# -- links --------------------------------------------------------------------------------------
def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen, out = {}, set()
    for _, line, lang in split_fences(path.read_text(encoding="utf-8")):
        m = re.match(r"#{1,6}\s+(.*)", line) if lang is None else None
        if m:
            base = slug(m.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(path: Path, text: str) -> list[tuple[int, str]]:
    found = []
    for n, line, lang in split_fences(text):
        if lang is None:
            found += [(n, m.group(1)) for m in LINK.finditer(INLINE.sub("", line))]
    return found


def link_failures(path: Path, text: str) -> list[str]:
    failures = []
    for n, target in links(path, text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            failures.append(f"{where(path, n)}: link to {target} — no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            failures.append(f"{where(path, n)}: link to {target} — no heading #{anchor} in {dest.name}")
    return failures


def report(failures: list[str], what: str) -> None:
    assert not failures, f"{len(failures)} {what}:\n" + "\n".join(failures)


# -- the tests ----------------------------------------------------------------------------------
def test_docs_exist():
    assert README.is_file()
    assert list(DOCS.glob("*.md")), "docs/ holds no pages"


def test_every_shown_command_parses():
    failures, checked = [], 0
    for path in pages():
        text = path.read_text(encoding="utf-8")
        failures += page_command_failures(path, text)
        checked += sum(1 for _, line in shell_lines(text) for _, w in simple_commands(line)
                       if is_cli(w[0]))
    assert checked >= 20, f"only {checked} medgemma-edge commands found in code blocks: is the extraction broken?"
    report(failures, "documented commands that would not parse")


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for _, t in links(README, README.read_text())}
    missing = [f"{p.relative_to(ROOT)}: not linked from README.md" for p in DOCS.glob("*.md") if p.resolve() not in linked]
    report(missing, "docs pages the README does not link")


def test_every_relative_link_resolves():
    failures = []
    for path in pages():
        failures += link_failures(path, path.read_text(encoding="utf-8"))
    report(failures, "broken links")


def test_every_preset_is_documented():
    from medgemma_edge.runtime.presets import PRESETS

    text = (DOCS / "structured.md").read_text(encoding="utf-8")
    missing = [f"docs/structured.md: preset `{name}` not listed" for name in PRESETS if f"`{name}`" not in text]
    report(missing, "presets missing from the docs")


# -- the checker itself must be able to fail ----------------------------------------------------
SAMPLE = """\
Prose: `medgemma-edge ask --no-such-flag` and `encode --bogus`, a [dead link](nowhere.md), `--nope X`.

```sh
# a comment, then a continued command with a bad flag
MEDGEMMA_EDGE_MODEL=b medgemma-edge ask --image x.png \\
    --not-a-flag "question"
medgemma-edge frobnicate -m b
medgemma-edge export SRC -o OUT --quant q9_z | tee log.txt
medgemma-edge ask -m b "fine" && make no-such-target
python -m benchmarks.no_such_bench --quick
cat <<EOF
medgemma-edge this-is-heredoc-text-not-a-command
EOF
medgemma-edge ask -m b --image x.png "fine too"   # --comment-flag is not read
```

```console
$ medgemma-edge verify bundle
medgemma-edge output-line --is-not-checked
```
"""


def test_the_checker_catches_what_it_guards(tmp_path):
    page = tmp_path / "sample.md"
    page.write_text(SAMPLE)
    with mock.patch(f"{__name__}.ROOT", tmp_path), mock.patch(f"{__name__}.makefile_targets", lambda: {"test"}):
        got = page_command_failures(page, SAMPLE) + link_failures(page, SAMPLE)
    text = "\n".join(got)
    expected = ["sample.md:1: `ask` has no option --no-such-flag", "sample.md:1: `encode` has no option --bogus",
                "sample.md:5: `ask` has no option --not-a-flag", "sample.md:7: no command `frobnicate`",
                "sample.md:8: `export`: Invalid value for '--quant'", "sample.md:9: no Makefile target `no-such-target`",
                "sample.md:10: no module benchmarks.no_such_bench", "sample.md:1: no command has option --nope",
                "sample.md:1: link to nowhere.md"]
    for e in expected:
        assert e in text, f"the checker missed {e!r}; it said:\n{text}"
    assert len(got) == len(expected), f"unexpected findings:\n{text}"


@pytest.mark.parametrize("heading,anchor", [
    ("Prepared studies: the first answer in seconds", "prepared-studies-the-first-answer-in-seconds"),
    ("Faster decode, and sharing the CPU", "faster-decode-and-sharing-the-cpu"),
    ("`--vision` and friends", "--vision-and-friends"),
])
def test_slug_matches_github(heading, anchor):
    assert slug(heading) == anchor
