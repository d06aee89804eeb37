"""kill -9 of the node itself — the real `medgemma-edge serve --dicom-port` process — in the middle of
a 40-instance transfer, then a restart and a resend of every instance (issue 22): no acknowledged
instance is lost, none is stored twice, and the study is prepared once.

The modality is dcmtk's storescu, one association per instance, so "acknowledged" is exact: an
instance whose storescu exited 0 got a success status from the node. The node is killed after the
15th. The restart re-reads the spool; the resend stores the 25 missing instances and finds the 15
it already holds (same bytes: no duplicate, no new file); the study is prepared when it goes
quiet — once, said by the audit log (one `study_prepared` with outcome "ok").
"""

from __future__ import annotations

import hashlib
import json
import time

import httpx
import pydicom
from pydicom.uid import generate_uid

from medgemma_edge.testing.pacs import free_port, storescu
from medgemma_edge.testing.serve import ServeProcess
from tests.dicom_helpers import write_series

SLICES, KILL_AFTER = 40, 15
STABLE_S = 5.0  # quiet time after the restarted node is ready: the resend lands well within it
READY_S = 300.0


def _node(bundle, spool, audit, log) -> ServeProcess:
    """`medgemma-edge serve -m BUNDLE --dicom-port …` in a subprocess (stopped by its pid)."""
    http, dicom = free_port(), free_port()
    node = ServeProcess(["-m", bundle, "--port", http, "--dicom-port", dicom, "--spool", spool, "--stable-s", STABLE_S,
                         "--max-slices", 4, "--threads", 2, "--audit-log", audit], log, http, ready_s=READY_S)
    node.dicom = dicom
    return node


def _spooled(spool) -> dict[str, str]:
    """SOP UID → sha256 of every complete file in the spool (leftover temp files fail the test)."""
    files = [p for p in (spool / "instances").rglob("*") if p.is_file()]
    assert all(p.suffix == ".dcm" for p in files), [p.name for p in files if p.suffix != ".dcm"]
    held = {}
    for p in files:
        uid = str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        assert uid not in held, "an instance is stored twice"
        held[uid] = hashlib.sha256(pydicom.dcmread(p).PixelData).hexdigest()
    return held


def test_kill_9_mid_transfer_then_restart_and_resend(tiny_bundle_f32, tmp_path):
    study_uid = generate_uid()
    files = write_series(tmp_path / "ct", SLICES, series_uid=generate_uid())
    for p in files:  # its own study
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID = study_uid
        ds.save_as(p)
    sent = {str(pydicom.dcmread(p).SOPInstanceUID): hashlib.sha256(pydicom.dcmread(p).PixelData).hexdigest()
            for p in files}
    spool, audit, log = tmp_path / "spool", tmp_path / "audit.jsonl", tmp_path / "serve.log"

    node = _node(tiny_bundle_f32, spool, audit, log).start()
    acknowledged = []
    try:
        for p in files[:KILL_AFTER]:
            assert storescu([p], node.dicom, "MGE").returncode == 0
            acknowledged.append(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID))
        node.kill9()  # mid-transfer: 25 instances still to come, nothing flushed on purpose
    finally:
        node.stop()
    held = _spooled(spool)
    assert set(acknowledged) <= set(held), "an acknowledged instance was lost"
    assert all(held[u] == sent[u] for u in acknowledged)

    node = _node(tiny_bundle_f32, spool, audit, log).start()
    try:
        run = storescu(files, node.dicom, "MGE")  # the modality sends the whole series again
        assert run.returncode == 0, run.stderr
        deadline = time.monotonic() + READY_S
        while True:
            rows = httpx.get(node.url + "/v1/studies", timeout=30).json()["data"]
            state = next((r["status"] for r in rows if r["uid"] == study_uid), None)
            assert state is None or not state.startswith("failed"), state
            if state == "ready":
                break
            assert time.monotonic() < deadline, f"study not ready: {state}"
            time.sleep(0.3)
    finally:
        node.stop()
    held = _spooled(spool)
    print(f"spool: {len(held)} instances after kill -9 at {KILL_AFTER} of {SLICES}, restart and resend")
    assert held == sent, "the spool must hold every instance once, with the bytes sent"
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    prepared = [e["outcome"] for e in events if e["event"] == "study_prepared"]
    print("study_prepared outcomes:", prepared)
    assert prepared == ["ok"], "the study must be prepared once"
