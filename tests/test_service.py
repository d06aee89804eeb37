"""deploy/medgemma-edge.service, the systemd unit docs/service.md sets up: every flag of its
ExecStart is one `medgemma-edge serve` takes and parses (click's own parser, the command is not
run), the service runs unprivileged with its state where it may write, and, where systemd is
installed, `systemd-analyze verify` finds nothing to say about it."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_docs import cli_problems

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "medgemma-edge.service"


def directives(text: str) -> list[tuple[str, str]]:
    """(key, value) of every setting, continuation lines joined, comments left out."""
    out, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith(("#", ";", "["))):
            continue
        pending += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            key, _, value = pending.partition("=")
            out.append((key.strip(), value.strip()))
            pending = ""
    return out


def settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, value in directives(UNIT.read_text()):
        out.setdefault(key, []).append(value)
    return out


def exec_start() -> tuple[dict, list[str]]:
    """The ExecStart command's words, and the environment its Environment= lines give it."""
    unit = settings()
    env = dict(shlex.split(v)[0].split("=", 1) for v in unit["Environment"])
    (command,) = unit["ExecStart"]
    return env, shlex.split(command)


def test_every_flag_of_the_exec_start_is_one_serve_takes():
    env, words = exec_start()
    print(words)
    assert words[0].startswith("/") and words[0].endswith("/bin/medgemma-edge") and words[1] == "serve"
    assert cli_problems(words[1:], env) == []
    assert {"--ssl-certfile", "--ssl-keyfile", "--api-key-file", "--spool", "--metrics"} <= set(words)


def test_the_service_is_unprivileged_restarted_bounded_and_writes_only_its_state():
    unit = settings()
    one = {key: values[-1] for key, values in unit.items()}
    assert one["User"] not in ("root", "0") and one["NoNewPrivileges"] == "yes" and one["CapabilityBoundingSet"] == ""
    assert one["Restart"] == "on-failure" and one["MemoryMax"].endswith("G")
    assert one["ProtectSystem"] == "strict" and one["PrivateTmp"] == "yes" and one["UMask"] == "0077"
    writable = one["ReadWritePaths"].split()
    env, words = exec_start()
    written = [words[words.index(flag) + 1] for flag in ("--spool", "--audit-log")] + [env["MEDGEMMA_EDGE_CACHE"]]
    for path in written:  # everything else is read-only under ProtectSystem=strict
        assert any(Path(path).is_relative_to(w) for w in writable), (path, writable)
    assert {f"/var/lib/{one['StateDirectory']}", f"/var/cache/{one['CacheDirectory']}"} <= set(writable)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd is not installed here")
def test_systemd_analyze_verify_finds_nothing_to_say(tmp_path):
    """verify wants the ExecStart program to exist: the unit is checked with this environment's
    console script in its place."""
    script = Path(sys.executable).parent / "medgemma-edge"
    if not script.exists():
        pytest.skip("no medgemma-edge console script beside this Python (pip install -e .)")
    _, words = exec_start()
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(words[0], str(script)))
    run = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    said = [ln for ln in (run.stdout + run.stderr).splitlines() if UNIT.name in ln]
    print(run.returncode, run.stdout, run.stderr)
    assert run.returncode == 0 and said == []
