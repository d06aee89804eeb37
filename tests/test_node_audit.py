"""The node's audit log (node/audit.py): JSON lines, owner-only files, a salted study hash, a key id
that is not the key, safe from many threads, and nothing when no log file is configured."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading

import pytest

from medgemma_edge.node.audit import EVENTS, AuditLog, key_id
from medgemma_edge.runtime.errors import InputError

STUDY = "1.2.826.0.1.3680043.8.498.1234567890"
KEY = "sk-local-very-secret-key"


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_one_json_line_per_event(tmp_path):
    log = AuditLog(tmp_path / "logs" / "audit.jsonl", tmp_path / "spool" / "audit-salt")
    for name in EVENTS:
        log.event(name, key_id=key_id(KEY), study_uid=STUDY, model_sha="ab" * 32)
    log.event("association_refused", outcome="AE EVIL@10.0.0.9 not allowed\nsecond line")
    got = lines(tmp_path / "logs" / "audit.jsonl")
    assert [r["event"] for r in got] == [*EVENTS, "association_refused"]
    assert set(got[0]) == {"time", "event", "key", "study", "model", "outcome"}
    assert got[0]["key"] == key_id(KEY) and got[0]["model"] == "ab" * 32 and got[0]["outcome"] == "ok"
    assert got[-1]["study"] is None and got[-1]["key"] == "none"
    assert got[-1]["outcome"] == "AE EVIL@10.0.0.9 not allowed second line", "an outcome stays one line"
    assert got[0]["time"].endswith("+00:00")
    text = (tmp_path / "logs" / "audit.jsonl").read_text()
    assert STUDY not in text and KEY not in text
    assert mode(tmp_path / "logs" / "audit.jsonl") == 0o600
    assert mode(tmp_path / "spool" / "audit-salt") == 0o600


def test_study_hash_is_salted_and_stable(tmp_path):
    salt = tmp_path / "audit-salt"
    first = AuditLog(tmp_path / "a.jsonl", salt).event("asked", study_uid=STUDY)["study"]
    again = AuditLog(tmp_path / "b.jsonl", salt).event("asked", study_uid=STUDY)["study"]
    other = AuditLog(tmp_path / "c.jsonl", tmp_path / "other-salt").event("asked", study_uid=STUDY)["study"]
    assert first == again, "one salt: one study, one hash (a study's lines link up)"
    assert first != other, "another node's salt: another hash"
    assert first != hashlib.sha256(STUDY.encode()).hexdigest(), "an unsalted hash could be looked up"
    assert AuditLog(tmp_path / "a.jsonl", salt).study_hash(STUDY) == first


def test_key_id():
    assert key_id(None) == "none" and key_id("") == "none"
    assert key_id(KEY) == hashlib.sha256(KEY.encode()).hexdigest()[:12] != key_id(KEY + "x")


def test_unknown_event_and_damaged_salt(tmp_path):
    log = AuditLog(tmp_path / "a.jsonl", tmp_path / "salt")
    with pytest.raises(ValueError, match="unknown audit event"):
        log.event("patient_looked_at")
    (tmp_path / "bad-salt").write_text("not hex")
    with pytest.raises(InputError, match="audit salt is damaged"):
        AuditLog(tmp_path / "b.jsonl", tmp_path / "bad-salt").event("asked", study_uid=STUDY)


def test_without_a_log_file_nothing_is_written(tmp_path):
    log = AuditLog(None, tmp_path / "audit-salt")
    assert log.event("asked", study_uid=STUDY) is None
    assert not list(tmp_path.iterdir()), "no file, not even the salt"


def test_threads_write_whole_lines(tmp_path):
    log = AuditLog(tmp_path / "a.jsonl", tmp_path / "salt")
    threads, per = 8, 40

    def writer(n):
        for i in range(per):
            log.event("study_received", study_uid=f"{STUDY}.{n}.{i}", outcome=f"t{n} i{i}")

    workers = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    got = lines(tmp_path / "a.jsonl")  # a torn or interleaved line would not parse
    assert len(got) == threads * per
    assert sorted(r["outcome"] for r in got) == sorted(f"t{n} i{i}" for n in range(threads) for i in range(per))
    assert len({r["study"] for r in got}) == threads * per
