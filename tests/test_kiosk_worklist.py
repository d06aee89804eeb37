"""The kiosk page's worklist (medgemma_edge/server/kiosk/worklist.js) in a real headless Chromium,
against a server running a DICOM node: a study sent by dcmtk's storescu shows up with its state,
the receptionist picks it, sees its preview, asks, reads the streamed answer, and presses "Send
draft to PACS": the draft lands in a real Orthanc and the page says so. With the server's API key
the worklist names the patient; without it, it does not. Every page runs under the kiosk's
Content-Security-Policy (a violation fails the test), as in tests/test_kiosk.py, whose browser
helpers these tests use."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.dicom_helpers import PATIENT_MARKERS, write_series
from medgemma_edge.testing.pacs import Orthanc, free_port, storescu
from tests.test_kiosk import API_KEY, _close, _new_page, ask_and_wait, open_kiosk
from tests.test_kiosk import browser  # noqa: F401 — the Chromium fixture

READY_MS = 300_000  # the tiny model prepares three slices on a loaded 2-core machine


@pytest.fixture(scope="module")
def model(tiny_bundle_f32, tmp_path_factory):
    import medgemma_edge

    return medgemma_edge.load(tiny_bundle_f32, threads=2, context=4096,
                              image_cache_dir=tmp_path_factory.mktemp("image-cache"))


def _send_study(folder, port: int, n=3) -> str:
    study = generate_uid()
    files = write_series(folder, n, series_uid=generate_uid())
    for p in files:
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID = study
        ds.save_as(p)
    run = storescu(files, port, "MGE")
    assert run.returncode == 0, run.stderr
    return study


def _serve(model, tmp_path, **node):
    from medgemma_edge.node.config import NodeConfig
    from medgemma_edge.server import ServerConfig, ServerThread, build_app
    from medgemma_edge.server.backend import LocalBackend

    api_key = node.pop("api_key", None)
    config = NodeConfig(port=free_port(), spool=tmp_path / "spool", stable_s=0.5, **node)
    return config, ServerThread(build_app(LocalBackend(model), ServerConfig(api_key=api_key), config))


def _study_button(page, study: str):
    return page.locator(f"button.study[data-uid='{study}']")


def test_pick_a_study_ask_and_send_the_draft_to_the_pacs(browser, model, tmp_path):
    from medgemma_edge.node.config import Peer

    with Orthanc(tmp_path / "orthanc") as pacs:
        config, server = _serve(model, tmp_path, results_to=Peer(pacs.aet, "127.0.0.1", pacs.port))
        with server:
            study = _send_study(tmp_path / "ct", config.port)
            context, page = _new_page(browser, server.url)
            try:
                open_kiosk(page)
                page.locator("#worklist").wait_for(state="visible", timeout=30_000)
                button = _study_button(page, study)
                button.wait_for(timeout=30_000)
                page.wait_for_function(f"() => document.querySelector(\"button.study[data-uid='{study}']\")"
                                       ".dataset.state === 'ready'", timeout=READY_MS)
                row = button.inner_text()
                print(f"worklist row: {row!r}")
                assert "CT" in row and "3 instances" in row and "ready" in row
                assert not any(m in page.content() for m in PATIENT_MARKERS.values()), "keyless page shows a patient"

                button.click()
                assert button.get_attribute("aria-pressed") == "true"
                page.wait_for_function("() => { const i = document.getElementById('preview-img');"
                                       " return i.complete && i.naturalWidth > 0; }", timeout=60_000)
                assert page.locator("#error").is_hidden(), page.locator("#error").inner_text()
                assert page.locator("#draft").is_hidden(), "no draft before an answer"

                answer = ask_and_wait(page, "Describe this CT.")
                assert page.locator("#error").is_hidden(), page.locator("#error").inner_text()
                assert answer.strip(), answer
                page.get_by_role("button", name="Send draft to PACS").click()
                page.wait_for_function("() => ['sent', 'failed'].includes("
                                       "document.getElementById('draft-status').dataset.state)", timeout=60_000)
                status = page.locator("#draft-status").inner_text()
                print(f"draft: {status!r}")
                assert "stored in the PACS" in status and "UNVERIFIED" in status
                shot = tmp_path / "kiosk-worklist.png"
                page.screenshot(path=str(shot), full_page=True)
                print(f"screenshot: {shot}")
                assert not page.foreign_requests, page.foreign_requests
            finally:
                _close(context, page)
        series = pacs.get(f"/studies/{pacs.get('/studies')[0]}")["Series"]
        modalities = [pacs.get(f"/series/{s}")["MainDicomTags"].get("Modality") for s in series]
        assert modalities == ["SR"], f"the PACS should hold the draft alone, got {modalities}"


def test_with_the_key_the_worklist_names_the_patient(browser, model, tmp_path):
    config, server = _serve(model, tmp_path, api_key=API_KEY, prepare="off")
    with server:
        study = _send_study(tmp_path / "ct", config.port, n=1)
        context, page = _new_page(browser, server.url)
        try:
            page.goto("/")
            page.evaluate(f"sessionStorage.setItem('medgemma-edge.api-key', {API_KEY!r})")  # kept for the tab
            open_kiosk(page)
            button = _study_button(page, study)
            button.wait_for(timeout=30_000)
            page.wait_for_function(f"() => document.querySelector(\"button.study[data-uid='{study}']\")"
                                   ".dataset.state === 'queued'", timeout=30_000)
            row = button.inner_text()
            print(f"keyed worklist row: {row!r}")
            assert "Quokka Zebedee" in row and PATIENT_MARKERS["PatientID"] in row and "queued" in row
        finally:
            _close(context, page)
