"""The node's HTTP face (server/studies.py, the study parts of server/translate.py): the worklist and
its key rule, a study's preview, questions naming a study or a series (with streamed progress when
it is not prepared yet), drafts stored into a real Orthanc (`store_result`, POST /v1/results), a
study pulled from Orthanc's DICOMweb, `image_dicom` parts, and the server's one default system
prompt. The tiny f32 bundle answers; studies arrive over DIMSE from dcmtk's storescu."""

from __future__ import annotations

import json
import logging
import time

import httpx
import openai
import pydicom
import pytest
from pydicom.uid import generate_uid

from medgemma_edge.runtime.presets import card_system
from tests.dicom_helpers import PATIENT_MARKERS, write_series
from medgemma_edge.testing.pacs import Orthanc, free_port, storescu
from tests.test_node_results import dsrdump

THREADS, CONTEXT, TOKENS = 2, 4096, 6
KEY = "node-test-key"


@pytest.fixture(scope="module")
def model(tiny_bundle_f32, tmp_path_factory):
    import medgemma_edge

    cache = tmp_path_factory.mktemp("image-cache")
    return medgemma_edge.load(tiny_bundle_f32, threads=THREADS, context=CONTEXT, image_cache_dir=cache)


def _series(folder, n=3):
    """n CT slices of a new study (patient markers set), as files; (study UID, series UID, files)."""
    study, series = generate_uid(), generate_uid()
    files = write_series(folder, n, series_uid=series)
    for p in files:
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID = study
        ds.save_as(p)
    return study, series, files


class Served:
    """A server with a node on free loopback ports; `.http` (httpx), `.client` (openai)."""

    def __init__(self, model, tmp_path, api_key=None, **node):
        from medgemma_edge.node.config import NodeConfig
        from medgemma_edge.server import ServerConfig, ServerThread, build_app
        from medgemma_edge.server.backend import LocalBackend

        self.config = NodeConfig(port=free_port(), spool=tmp_path / "spool", **{"stable_s": 0.5, **node})
        self.app = build_app(LocalBackend(model), ServerConfig(api_key=api_key), self.config)
        self.node = self.app.state.medgemma.node
        self.thread = ServerThread(self.app)
        self.api_key = api_key

    def __enter__(self):
        self.thread.start()
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.http = httpx.Client(base_url=self.thread.url, timeout=300, headers=headers)
        self.client = openai.OpenAI(base_url=self.thread.url + "/v1", api_key=self.api_key or "unused",
                                    max_retries=0, timeout=300)
        return self

    def __exit__(self, *exc):
        self.http.close()
        self.thread.stop()

    def send(self, files, required=False):
        run = storescu(files, self.config.port, "MGE", required=required)
        assert run.returncode == 0, run.stderr

    def wait(self, uid, states=("ready",), timeout=300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.http.get(f"/v1/studies/{uid}")
            if r.status_code == 200 and r.json()["state"] in states:
                return r.json()
            time.sleep(0.2)
        pytest.fail(f"study not {states} in {timeout} s: {r.status_code} {r.text[:300]}")

    def ask(self, url, question="Describe the findings.", **extra):
        return self.http.post("/v1/chat/completions", json={"max_tokens": TOKENS, **extra, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]})


def _error(r, status) -> str:
    assert r.status_code == status, (r.status_code, r.text[:500])
    message = r.json()["error"]["message"]
    assert "\n" not in message and "Traceback" not in r.text
    return message


def test_the_server_and_ask_share_one_default_system_prompt():
    from medgemma_edge.server.translate import chat_request

    def system(body):
        return chat_request(body, {}, max_images=4, max_tokens=8).messages[0]

    png = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQ"
           "AAAABJRU5ErkJggg==")  # one pixel
    picture = [{"type": "image_url", "image_url": {"url": png}}, {"type": "text", "text": "Q"}]
    assert system({"messages": [{"role": "user", "content": picture}]}) == {"role": "system",
                                                                            "content": card_system(True)}
    assert system({"messages": [{"role": "user", "content": "Q"}]}) == {"role": "system", "content": card_system(False)}
    assert system({"messages": [{"role": "system", "content": "Mine."}, {"role": "user", "content": "Q"}]})[
        "content"] == "Mine."
    assert system({"messages": [{"role": "user", "content": "Q"}], "preset": "dermatology"})[
        "content"] == "You are an expert dermatologist."


def test_a_server_without_a_node_says_so(model, tmp_path):
    from medgemma_edge.server import ServerConfig, ServerThread, build_app
    from medgemma_edge.server.backend import LocalBackend

    with ServerThread(build_app(LocalBackend(model), ServerConfig())) as server, \
            httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.get("/health").json()["node"] is False
        assert "--dicom-port" in _error(http.get("/v1/studies"), 404)
        body = {"max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "medgemma-edge:study/1.2.3"}}]}]}
        assert "no DICOM node" in _error(http.post("/v1/chat/completions", json=body), 400)
        assert "--results-to" in _error(http.post("/v1/results", json={"completion_id": "x"}), 400)
        store = {**body, "messages": [{"role": "user", "content": "hi"}], "medgemma_edge": {"store_result": True}}
        assert "store_result" in _error(http.post("/v1/chat/completions", json=store), 400)


def test_worklist_preview_and_a_question_that_prepares_the_study_with_progress(model, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    study, series, files = _series(tmp_path / "ct")
    audit = tmp_path / "audit.jsonl"
    with Served(model, tmp_path, prepare="off", audit_log=audit) as served:
        assert served.http.get("/health").json()["node"] is True
        served.send(files)
        row = served.wait(study, ("queued",))  # --prepare off: it waits for its first question
        listed = served.http.get("/v1/studies").json()["data"]
        assert [r["uid"] for r in listed] == [study] and row["instances"] == 3 and row["modalities"] == ["CT"]
        assert not any(m in json.dumps(listed) for m in PATIENT_MARKERS.values()), "keyless: no patient values"
        assert "GET /v1/studies" in _error(served.http.get("/v1/studies/1.2.3.4"), 404)

        png = served.http.get(f"/v1/studies/{study}/preview.png")
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
        assert png.headers["cache-control"] == "no-store"

        assert "no study" in _error(served.ask("medgemma-edge:study/1.2.3.4"), 400)
        # Not prepared: the streamed answer says how the encoding goes, before the first token.
        events, order = [], []
        stream = served.client.chat.completions.create(model="any", max_tokens=TOKENS, stream=True, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"medgemma-edge:study/{study}"}},
                                         {"type": "text", "text": "Any bleed?"}]}])
        for chunk in stream:
            extra = (chunk.model_extra or {}).get("medgemma_edge") or {}
            if extra.get("progress"):
                events.append(extra["progress"])
                order.append("progress")
                assert chunk.choices[0].delta.content in (None, "")
            elif chunk.choices and chunk.choices[0].delta.content:
                order.append("text")
        print("progress:", events, "order:", "".join(o[0] for o in order))
        # images encoded (i of 3, before the first and after each), then the prompt evaluated
        assert [(e["stage"], e["done"], e["total"]) for e in events[:4]] == [("images", i, 3) for i in range(4)]
        assert {e["stage"] for e in events[4:]} == {"prompt"} and events[-1]["done"] == events[-1]["total"]
        assert order.index("text") > max(i for i, o in enumerate(order) if o == "progress")
        assert served.http.get(f"/v1/studies/{study}").json()["state"] == "ready", "answered: prepared now"

        by_series = served.ask(f"medgemma-edge:series/{series}")
        assert by_series.status_code == 200, by_series.text
        assert by_series.json()["medgemma_edge"]["stats"]["images"] == 3
        assert "no series" in _error(served.ask("medgemma-edge:series/1.2.3.4"), 400)

    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    print([(r["event"], r["outcome"]) for r in lines])
    assert [r["event"] for r in lines].count("asked") == 2 and lines[0]["event"] == "study_received"
    assert study not in audit.read_text() and all(r["key"] == "none" for r in lines)
    seen = caplog.text + audit.read_text()
    assert not [m for m in PATIENT_MARKERS.values() if m in seen], "a patient value reached a log or the audit"
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("medgemma_edge"))
    assert "GET /v1/studies/UID/preview.png 200" in ours and study not in ours, "a study UID in our log"


def test_patient_values_only_for_a_keyed_request(model, tmp_path):
    study, _, files = _series(tmp_path / "ct", n=1)
    with Served(model, tmp_path, api_key=KEY, prepare="off") as served:
        served.send(files)
        served.wait(study, ("queued",))
        assert httpx.get(served.thread.url + "/v1/studies").status_code == 401
        row = served.http.get("/v1/studies").json()["data"][0]
        assert row["patient_name"] == PATIENT_MARKERS["PatientName"]
        assert row["patient_id"] == PATIENT_MARKERS["PatientID"]
        assert row["accession"] == PATIENT_MARKERS["AccessionNumber"]
        assert served.http.get(f"/v1/studies/{study}").json()["patient_name"] == PATIENT_MARKERS["PatientName"]


def _wait_draft(served, draft_id, timeout=60) -> dict:
    deadline = time.monotonic() + timeout
    while (status := served.http.get(f"/v1/results/{draft_id}").json())["state"] not in ("sent", "failed"):
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    return status


def _drafts(pacs, study) -> list[pydicom.Dataset]:
    from dicomweb_client import DICOMwebClient

    client = DICOMwebClient(pacs.dicomweb)
    out = []
    for series in client.search_for_series(study, search_filters={"Modality": "SR"}):
        series_uid = series["0020000E"]["Value"][0]
        for inst in client.search_for_instances(study, series_uid):
            out.append(client.retrieve_instance(study, series_uid, inst["00080018"]["Value"][0]))
    return out


def test_drafts_land_in_the_pacs_as_unverified_reports(model, tmp_path):
    from medgemma_edge.node.config import Peer
    from medgemma_edge.node.results import answer_text

    study, _, files = _series(tmp_path / "ct", n=2)
    with Orthanc(tmp_path / "orthanc") as pacs, \
            Served(model, tmp_path, results_to=Peer(pacs.aet, "127.0.0.1", pacs.port)) as served:
        for f in files:  # the PACS holds the study the drafts join
            pacs.upload(f.read_bytes())
        served.send(files)
        served.wait(study)
        url = f"medgemma-edge:study/{study}"
        stored = served.ask(url, "Is there a bleed?", medgemma_edge={"store_result": True})
        assert stored.status_code == 200, stored.text
        answer = stored.json()["choices"][0]["message"]["content"]
        result = stored.json()["medgemma_edge"]["result"]
        assert result["state"] in ("queued", "sending", "sent") and result["id"], result
        assert _wait_draft(served, result["id"])["state"] == "sent"

        # streamed, then stored after the fact (the kiosk's "Send draft to PACS")
        chunks = list(served.client.chat.completions.create(model="any", max_tokens=TOKENS, stream=True, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "Any fracture?"}]}]))
        later = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        posted = served.http.post("/v1/results", json={"completion_id": chunks[0].id})
        assert posted.status_code == 200, posted.text
        assert _wait_draft(served, posted.json()["id"])["state"] == "sent"
        assert "no recent answer" in _error(served.http.post("/v1/results", json={"completion_id": "chatcmpl-x"}), 404)
        assert "no draft" in _error(served.http.get("/v1/results/0123"), 404)

        drafts = _drafts(pacs, study)
        assert sorted(answer_text(d) for d in drafts) == sorted([answer, later]), [answer_text(d) for d in drafts]
        for draft in drafts:
            assert draft.VerificationFlag == "UNVERIFIED" and draft.StudyInstanceUID == study
            assert "not for diagnosis" in draft.SeriesDescription
        dsrdump(drafts[0], tmp_path)


def test_a_study_is_pulled_from_dicomweb_and_image_dicom_stays_on_that_server(model, tmp_path):
    study, series, files = _series(tmp_path / "ct", n=2)
    with Orthanc(tmp_path / "orthanc") as pacs, Served(model, tmp_path, dicomweb=pacs.dicomweb) as served:
        for f in files:
            pacs.upload(f.read_bytes())
        pulled = served.ask(f"medgemma-edge:study/{study}")
        assert pulled.status_code == 200, pulled.text
        assert pulled.json()["medgemma_edge"]["stats"]["images"] == 2
        assert len(served.node.spool.instances(study)) == 2
        assert "no such study" in _error(served.ask(f"medgemma-edge:study/{generate_uid()}"), 400)

        def dicom_part(uri):
            return served.http.post("/v1/chat/completions", json={"max_tokens": 2, "messages": [
                {"role": "user", "content": [{"type": "image_dicom", "image_dicom": {"dicom_source": [uri]}},
                                             {"type": "text", "text": "Q?"}]}]})

        ok = dicom_part(f"{pacs.dicomweb}/studies/{study}/series/{series}")
        assert ok.status_code == 200 and ok.json()["medgemma_edge"]["stats"]["images"] == 2, ok.text
        elsewhere = dicom_part(f"http://198.51.100.7:8042/dicom-web/studies/{study}")
        assert "no other host" in _error(elsewhere, 400)


@pytest.mark.parametrize("flags,says", [
    (["--dicom-port", "11112", "--host", "0.0.0.0"], "--dicom-allow"),
    (["--dicom-port", "11112", "--results-to", "ORTHANC@127.0.0.1"], "AE@HOST:PORT"),
    (["--dicom-port", "11112", "--dicom-allow", "ORTHANC@127.0.0.1:4242"], "without a port"),
    (["--dicom-port", "11112", "--dicom-ae", "A\\B"], "AE title"),
    (["--dicom-port", "11112", "--dicomweb", "ftp://pacs/dicom-web"], "http(s) URL"),
    (["--dicom-port", "11112", "--upstream", "http://127.0.0.1:9/v1"], "not --upstream"),
])
def test_serve_refuses_a_node_it_cannot_run_before_any_port_opens(tiny_bundle_f32, tmp_path, flags, says):
    from click.testing import CliRunner

    from medgemma_edge.cli import main

    key = tmp_path / "key"
    key.write_text("k3y\n")
    out = CliRunner().invoke(main, ["serve", "-m", str(tiny_bundle_f32), "--api-key-file", str(key),
                                    "--spool", str(tmp_path / "spool"), *flags])
    print(out.output)
    assert out.exit_code == 2 and says in out.output and len(out.output.strip().splitlines()) == 1
    assert not (tmp_path / "spool").exists(), "refused before the spool was made"


def test_a_whole_slide_pushed_to_the_node_is_prepared_and_asked_as_its_patches(model, tmp_path):
    """A DICOM WSI (two levels, one instance each) sent with storescu: the series is a slide, the
    node prepares its tissue patches, a question naming the series gets them, and they are the
    patches the same files give from a folder of their own (pixel-equal)."""
    import numpy as np

    from medgemma_edge.runtime.sources import load_pictures
    from tests.wsi_helpers import block_mean, patch_level_image, write_dicom_wsi

    level0 = patch_level_image(2000, 1900, seed=3)
    files = write_dicom_wsi(tmp_path / "wsi", [level0, block_mean(level0, 4)], mpp=1.0)
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    study, series = ds.StudyInstanceUID, ds.SeriesInstanceUID
    expected = load_pictures(str(files[0]))
    with Served(model, tmp_path) as served:
        served.send(files, required=True)
        row = served.wait(study, ("ready", "failed"))
        print(row)
        assert row["state"] == "ready", row
        assert row["modalities"] == ["SM"] and row["instances"] == 2
        _, items = served.node.study_items(None, series)
        got = load_pictures(items[0]["image"])
        assert len(got) == len(expected) >= 1
        worst = max(int(np.abs(a.pixels.astype(int) - b.pixels).max()) for a, b in zip(got, expected))
        print(f"{len(got)} patches, worst difference against the original files: {worst}")
        assert worst == 0
        r = served.ask(f"medgemma-edge:series/{series}", "Describe the tissue.")
        assert r.status_code == 200, r.text
        stats = r.json()["medgemma_edge"]["stats"]
        assert stats["images"] == len(expected) and stats["images_from_cache"] == len(expected), stats
        png = served.http.get(f"/v1/studies/{study}/preview.png")
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
