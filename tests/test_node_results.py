"""Drafts back into the PACS (node/results.py, node/outbox.py): the answer as an unverified
Comprehensive SR in the patient's study, stored into a real Orthanc over DIMSE and STOW-RS, read
back through Orthanc's WADO-RS, checked by pydicom and by dcmtk's dsrdump; a failed send retried,
reported in one line, kept, and resent by the next Outbox on the folder. No patient value in any
log record or audit line."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import time
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medgemma_edge.node.audit import AuditLog
from medgemma_edge.node.config import Peer
from medgemma_edge.node.outbox import Outbox
from medgemma_edge.node.results import SERIES_DESCRIPTION, answer_text, draft_sr
from medgemma_edge.node.spool import Spool
from medgemma_edge.runtime import __version__
from medgemma_edge.runtime.errors import InputError
from tests.dicom_helpers import PATIENT_MARKERS, with_patient
from medgemma_edge.testing.pacs import Orthanc, free_port, need

CANARY = "PHI^CANARY"
MARKERS = [CANARY, *PATIENT_MARKERS.values()]
QUESTION = "Is there a pneumothorax?"
ANSWER = "No pneumothorax. Small nodule in the right upper lobe — follow-up CT suggested.\nµ ≤ 5 mm"
MODEL, SHA = "medgemma-4b-it q4_k_m", "0123456789abcdef" * 4
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
FAST = dict(backoff_s=0.05, timeout_s=5.0)  # retries in test time, not clinic time


@pytest.fixture
def spool(tmp_path):
    return Spool(tmp_path / "spool", 1 << 30)


def ct_bytes(series_uid: str | None = None, **tags) -> bytes:
    """pydicom's CT_small carrying the patient markers (PatientName PHI^CANARY)."""
    ds = with_patient(pydicom.dcmread(get_testdata_file("CT_small.dcm")))
    ds.PatientName = CANARY
    if series_uid is not None:  # another instance of the same study, in another series
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
    with warnings.catch_warnings():  # pydicom warns (quoting it) when a value breaks its VR's rules
        warnings.simplefilter("ignore")
        for keyword, value in tags.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def draft(refs, answer: str = ANSWER):
    return draft_sr(QUESTION, answer, references=refs, model_name=MODEL, bundle_sha256=SHA,
                    software_version=__version__)


def dsrdump(ds, folder: Path) -> str:
    """dcmtk's dump of the draft; fails unless it reads it without an error."""
    path = folder / "draft.dcm"
    ds.save_as(path, enforce_file_format=True)
    run = subprocess.run([need("dsrdump"), str(path)], capture_output=True, text=True, timeout=60)
    out = run.stdout + run.stderr
    errors = [line for line in out.splitlines() if line.startswith(("E:", "F:")) or "Error" in line]
    assert run.returncode == 0 and not errors, f"dsrdump rc {run.returncode}, errors {errors}:\n{out[-2000:]}"
    return out


def texts(ds) -> dict[str, list[str]]:
    """Every TEXT item's value by concept meaning, the whole tree."""
    found: dict[str, list[str]] = {}

    def walk(items):
        for item in items:
            if item.ValueType == "TEXT":
                found.setdefault(item.ConceptNameCodeSequence[0].CodeMeaning, []).append(str(item.TextValue))
            walk(item.get("ContentSequence", []))
    walk(ds.ContentSequence)
    return found


def check_draft(sr, ct, refs):
    """What every stored draft must be; `ct` is a referenced image's dataset."""
    assert sr.SOPClassUID == COMPREHENSIVE_SR and sr.Modality == "SR"
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
    assert sr.PreliminaryFlag == "PRELIMINARY"
    assert sr.StudyInstanceUID == ct.StudyInstanceUID, "the draft must be filed in the patient's study"
    assert sr.SeriesInstanceUID not in {r.series_uid for r in refs}, "the draft needs a series of its own"
    assert sr.SeriesDescription == SERIES_DESCRIPTION
    assert "UNVERIFIED" in sr.SeriesDescription and "not for diagnosis" in sr.SeriesDescription
    assert str(sr.PatientName) == CANARY and sr.PatientID == ct.PatientID, "patient module copied"
    assert sr.AccessionNumber == ct.AccessionNumber
    assert answer_text(sr) == ANSWER, f"answer read back {answer_text(sr)!r}"
    got = texts(sr)
    assert got["Request"] == [QUESTION] and got["Finding"] == [ANSWER]
    assert got["Algorithm Name"] == [MODEL] and got["Algorithm Version"] == [SHA]
    assert any(__version__ in p for p in got["Algorithm Parameters"]), got["Algorithm Parameters"]
    assert sr.SoftwareVersions == f"medgemma-edge {__version__}"
    observer = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in sr.ContentSequence
                if i.RelationshipType == "HAS OBS CONTEXT"}
    assert observer["Observer Type"].ConceptCodeSequence[0].CodeValue == "121007", "observer is a device"
    evidence = {(s.SeriesInstanceUID, r.ReferencedSOPInstanceUID)
                for e in sr.CurrentRequestedProcedureEvidenceSequence
                for s in e.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
    assert evidence == {(r.series_uid, r.sop_uid) for r in refs}


# -- the draft itself (no PACS) ---------------------------------------------------------------------
def test_draft_holds_answer_in_patients_study(spool, tmp_path, caplog):
    refs = [spool.put(ct_bytes()), spool.put(ct_bytes(series_uid=generate_uid()))]
    with caplog.at_level(logging.DEBUG):
        sr = draft(refs + refs[:1])  # a reference given twice is listed once
    ct = pydicom.dcmread(refs[0].path)
    check_draft(sr, ct, refs)
    images = [i for s in sr.ContentSequence for f in s.get("ContentSequence", [])
              for i in f.get("ContentSequence", []) if i.ValueType == "IMAGE"]
    assert [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images] == [r.sop_uid for r in refs]
    out = dsrdump(sr, tmp_path)
    assert "Comprehensive SR" in out and "UNVERIFIED" in out
    assert not [m for m in MARKERS if m in caplog.text]
    assert ct.StudyInstanceUID not in caplog.text, "highdicom logs the UIDs it copies; it must be quiet"


def test_header_without_patient_attributes_still_drafts(spool, tmp_path):
    # Attributes highdicom reads and checks, missing or breaking their VR's rules (archives hold
    # such headers): the draft is written with them empty, never refused.
    ref = spool.put(ct_bytes(PatientID=None, AccessionNumber=None, StudyID=None, PatientSex="X",
                             PatientBirthDate="19xx", StudyDate="2004-13-45", StudyTime="25:99"))
    sr = draft([ref])
    assert sr.PatientID == "" and sr.AccessionNumber == "" and answer_text(sr) == ANSWER
    assert sr.PatientSex == "" and sr.PatientBirthDate == "" and sr.StudyDate == "" and sr.StudyTime == ""
    assert draft([spool.put(ct_bytes(SOPInstanceUID=generate_uid(), PatientSex="f"))]).PatientSex == "F"
    dsrdump(sr, tmp_path)


def test_draft_refuses_bad_references(spool):
    with pytest.raises(InputError, match="at least one"):
        draft([])
    other = spool.put(ct_bytes(StudyInstanceUID=generate_uid(), SOPInstanceUID=generate_uid()))
    with pytest.raises(InputError, match="several studies"):
        draft([spool.put(ct_bytes()), other])


# -- into Orthanc -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    with Orthanc(tmp_path_factory.mktemp("orthanc")) as orthanc:
        orthanc.upload(ct_bytes())  # the study exists before its draft arrives
        yield orthanc


def outbox(folder, pacs, via: str, **kw) -> Outbox:
    peer = Peer(pacs.aet, "127.0.0.1", pacs.port) if via == "dimse" else None
    return Outbox(folder, peer, pacs.dicomweb if via == "stow" else None, "MGE", **{**FAST, **kw})


def wait_state(box: Outbox, draft_id: str, states=("sent", "failed"), timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while (status := box.status(draft_id))["state"] not in states:
        assert time.monotonic() < deadline, f"draft still {status} after {timeout} s"
        time.sleep(0.02)
    return status


def wado(pacs, sr) -> pydicom.Dataset:
    """The draft as Orthanc's WADO-RS returns it."""
    from dicomweb_client import DICOMwebClient

    return DICOMwebClient(pacs.dicomweb).retrieve_instance(
        sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.SOPInstanceUID)


@pytest.mark.parametrize("via", ["dimse", "stow"])
def test_draft_lands_in_orthanc(pacs, spool, tmp_path, caplog, capfd, via):
    ref = spool.put(ct_bytes())
    audit = AuditLog(tmp_path / "audit.jsonl", spool.root / "audit-salt")
    events = []

    def on_event(name, d):
        events.append(name)
        if name in ("sent", "failed"):
            audit.event("result_stored", study_uid=d.study_uid, model_sha=SHA,
                        outcome="ok" if name == "sent" else f"failed: {d.error}")

    with caplog.at_level(logging.DEBUG):
        sr = draft([ref])
        box = outbox(spool.root / "outbox", pacs, via, on_event=on_event).start()
        try:
            draft_id = box.submit(sr)
            status = wait_state(box, draft_id)
        finally:
            box.stop()
    assert status == {"id": draft_id, "state": "sent", "attempts": 1, "error": None}, status
    assert events == ["queued", "sent"]
    assert not list((spool.root / "outbox").iterdir()), "a sent draft's file is the PACS's now"

    back = wado(pacs, sr)
    check_draft(back, pydicom.dcmread(ref.path), [ref])
    dsrdump(back, tmp_path)
    series = pacs.get(f"/studies/{pacs.get('/studies')[0]}")["Series"]
    assert len(series) >= 2, "the draft must join the CT's study in Orthanc, as a series of its own"

    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(r["event"], r["outcome"]) for r in lines] == [("result_stored", "ok")]
    assert lines[0]["study"] == audit.study_hash(sr.StudyInstanceUID)
    seen = caplog.text + "".join(capfd.readouterr()) + (tmp_path / "audit.jsonl").read_text()
    assert not [m for m in MARKERS if m in seen], "a patient value reached a log line or the audit"
    assert sr.StudyInstanceUID not in (tmp_path / "audit.jsonl").read_text()


@pytest.mark.parametrize("via", ["dimse", "stow"])
def test_failed_send_is_retried_reported_and_kept(spool, tmp_path, caplog, via):
    # A PACS that is down: nothing listens on these ports.
    down = type("Down", (), {"aet": "ORTHANC", "port": free_port(),
                             "dicomweb": f"http://127.0.0.1:{free_port()}/dicom-web"})
    events = []
    box = outbox(spool.root / "outbox", down, via, attempts=3,
                 on_event=lambda name, d: events.append(name)).start()
    try:
        with caplog.at_level(logging.WARNING, logger="medgemma_edge.node.outbox"):
            draft_id = box.submit(draft([spool.put(ct_bytes())]))
            status = wait_state(box, draft_id)
    finally:
        box.stop()
    assert status["state"] == "failed" and status["attempts"] == 3, status
    assert events == ["queued", "retry", "retry", "failed"]
    assert status["error"] and "\n" not in status["error"], status
    assert (spool.root / "outbox" / f"{draft_id}.dcm").is_file(), "a failed draft's file must be kept"
    reports = [r.getMessage() for r in caplog.records if draft_id in r.getMessage()]
    assert len(reports) == 1 and "\n" not in reports[0] and "3 attempts" in reports[0], reports


def test_restart_resends_queued_draft_once_pacs_is_back(spool, tmp_path):
    with Orthanc(tmp_path / "orthanc") as pacs:
        pacs.upload(ct_bytes())
    # Orthanc is down now; the draft waits on disk through a stop (the node going down).
    folder = spool.root / "outbox"
    box = outbox(folder, pacs, "dimse", attempts=1000).start()
    sr = draft([spool.put(ct_bytes())])
    draft_id = box.submit(sr)
    deadline = time.monotonic() + 30
    while box.status(draft_id)["attempts"] < 2:
        assert time.monotonic() < deadline, box.status(draft_id)
        time.sleep(0.02)
    started = time.monotonic()
    box.stop()
    assert time.monotonic() - started < 5, "stop() must end the sender promptly"
    assert box.status(draft_id)["state"] == "queued"

    with Orthanc(tmp_path / "orthanc") as pacs:  # the same storage and ports: the PACS is back
        again = outbox(folder, pacs, "dimse")
        assert again.status(draft_id) == {"id": draft_id, "state": "queued", "attempts": 0, "error": None}
        again.start()
        try:
            status = wait_state(again, draft_id)
        finally:
            again.stop()
        assert status["state"] == "sent", status
        assert answer_text(wado(pacs, sr)) == ANSWER
    assert not list(folder.iterdir())
