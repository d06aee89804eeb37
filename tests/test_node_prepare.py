"""Background preparation (node/prepare.py, node/node.py) on the real worker and the tiny model,
without HTTP: a quiet study is prepared to `ready`; a damaged file fails its study with one line
and the node goes on; a study with nothing the model reads says why; after a restart the spool is
read again and a study prepared before is found in the image cache (no image encoded again)."""

from __future__ import annotations

import io
import time

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.dicom_helpers import PATIENT_MARKERS, write_series

WAIT_S = 300


@pytest.fixture(scope="module")
def model(tiny_bundle_f32, tmp_path_factory):
    import medgemma_edge

    return medgemma_edge.load(tiny_bundle_f32, threads=2, context=4096,
                              image_cache_dir=tmp_path_factory.mktemp("image-cache"))


@pytest.fixture
def steps(model, monkeypatch):
    """The kinds of every preparation step the model runs."""
    seen, original = [], model.prepare_steps

    def recorded(*args, **kwargs):
        for step in original(*args, **kwargs):
            seen.append(step.kind)
            yield step

    monkeypatch.setattr(model, "prepare_steps", recorded)
    return seen


def _state(model, spool, **node):
    from medgemma_edge.node.config import NodeConfig
    from medgemma_edge.server.backend import LocalBackend
    from medgemma_edge.server.config import ServerConfig
    from medgemma_edge.server.state import ServerState
    from medgemma_edge.testing.pacs import free_port

    return ServerState(LocalBackend(model), ServerConfig(), NodeConfig(port=free_port(), spool=spool, stable_s=0.2,
                                                                       **node))


def _study_files(folder, n=2) -> tuple[str, list[bytes]]:
    study = generate_uid()
    out = []
    for path in write_series(folder, n, series_uid=generate_uid()):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study
        buf = io.BytesIO()
        ds.save_as(buf)
        out.append(buf.getvalue())
    return study, out


def _receive(node, blobs) -> None:
    for data in blobs:  # as the listener does: into the spool, then noted
        node.received(node.spool.put(data))


def _wait(node, uid, states=("ready", "failed")):
    deadline = time.monotonic() + WAIT_S
    while (study := node.book.study(uid)) is None or study.state not in states:
        assert time.monotonic() < deadline, study and study.describe_state()
        time.sleep(0.05)
    return study


def test_prepared_failed_and_prepared_again_after_a_restart(model, steps, tmp_path, caplog):
    spool = tmp_path / "spool"
    good, good_files = _study_files(tmp_path / "good")
    broken, broken_files = _study_files(tmp_path / "broken")
    cut = broken_files[0]
    broken_files[0] = cut[:len(cut) - 40]  # pixel data cut short: the header still reads
    sr_only = generate_uid()
    report = pydicom.dcmread(io.BytesIO(good_files[0]))
    report.StudyInstanceUID, report.SeriesInstanceUID, report.SOPInstanceUID = sr_only, generate_uid(), generate_uid()
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
    report.Modality = "SR"
    buf = io.BytesIO()
    report.save_as(buf)

    state = _state(model, spool)
    state.start()
    try:
        node = state.node
        _receive(node, broken_files)
        _receive(node, [buf.getvalue()])
        _receive(node, good_files)
        failed = _wait(node, broken)
        print("broken:", failed.describe_state())
        assert failed.state == "failed" and "\n" not in failed.why and failed.why and str(tmp_path) not in failed.why
        assert not any(m in failed.why for m in PATIENT_MARKERS.values())
        nothing = _wait(node, sr_only)
        print("report only:", nothing.describe_state())
        assert nothing.state == "failed" and "no series the model reads" in nothing.why and "report" in nothing.why
        assert _wait(node, good).state == "ready", "the node goes on after a failed study"
        assert "saved" in steps
    finally:
        state.stop()

    steps.clear()
    again = _state(model, spool)  # a restart: the spool is read again, prepared studies found
    again.start()
    try:
        assert _wait(again.node, good).state == "ready"
        assert _wait(again.node, broken).state == "failed"
    finally:
        again.stop()
    print("steps after the restart:", steps)
    assert "encode" not in steps and "saved" not in steps and "skipped" in steps
    assert not any(m in caplog.text for m in PATIENT_MARKERS.values())


def test_prepare_off_leaves_studies_queued(model, steps, tmp_path):
    state = _state(model, tmp_path / "spool", prepare="off")
    state.start()
    try:
        uid, files = _study_files(tmp_path / "ct", n=1)
        _receive(state.node, files)
        assert _wait(state.node, uid, ("queued",)).state == "queued"
        time.sleep(0.5)
        assert state.node.book.study(uid).state == "queued" and steps == []
    finally:
        state.stop()
