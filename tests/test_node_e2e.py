"""The DICOM node end to end (issue 22's first acceptance test): a real Orthanc pushes a CT series
and an X-ray to the node over DIMSE (Orthanc REST /modalities/{id}/store), dcmtk's storescu sends
another study; every instance is in the spool, unchanged; the studies reach `ready` on their own;
a question about each through the `openai` client starts at the prepared prefix (restored from
disk, no image encoded) and its answer equals what `medgemma_edge.load(...).chat` gives on the
same files with `ask`'s defaults (the model card's system prompt, greedy). The tiny f32 bundle
answers; no patient value reaches the log or a keyless worklist.

Orthanc and dcmtk must be installed (`make test` does it): these tests fail, never skip, without.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

import httpx
import numpy as np
import openai
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import DigitalXRayImageStorageForPresentation, generate_uid

from medgemma_edge.runtime.presets import card_system
from tests.dicom_helpers import PATIENT_MARKERS, image_dataset, save, write_series
from medgemma_edge.testing.pacs import Orthanc, free_port, storescu

THREADS, CONTEXT = 2, 4096
TOKENS = 8
READY_S = 600  # three studies encoded by the tiny model on a loaded 2-core CI machine
QUESTION = "Describe the findings."


def _xray(path, study_uid):
    """A DX radiograph written from scratch: 16-bit gradient with a bright disc, patient tags set."""
    yy, xx = np.mgrid[0:96, 0:80]
    pixels = (40 * yy + 10 * xx + 3000 * (((yy - 48) ** 2 + (xx - 40) ** 2) < 300)).astype(np.uint16)
    ds = image_dataset(pixels, modality="DX", series_uid=generate_uid(), instance=1, slope=None, intercept=None)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.StudyInstanceUID, ds.SeriesNumber = study_uid, 1
    ds.PresentationIntentType, ds.ImageType = "FOR PRESENTATION", ["ORIGINAL", "PRIMARY"]
    return save(ds, path)


def _ct_series(folder, study_uid):
    paths = write_series(folder, 3, series_uid=generate_uid())
    for p in paths:  # write_series shares one study UID between tests: give this one its own
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID = study_uid
        ds.save_as(p)
    return paths


def _pixels_sha(path_or_bytes) -> tuple[str, str]:
    ds = pydicom.dcmread(path_or_bytes)
    return str(ds.SOPInstanceUID), hashlib.sha256(ds.PixelData).hexdigest()


@pytest.fixture(scope="module")
def reference(tiny_bundle_f32):
    import medgemma_edge

    return medgemma_edge.load(tiny_bundle_f32, threads=THREADS, context=CONTEXT)


def _ask_reference(model, source) -> str:
    """What `medgemma-edge ask QUESTION --image SOURCE --max-tokens 8` answers (its messages)."""
    messages = [{"role": "system", "content": card_system(True)},
                {"role": "user", "content": [{"type": "image", "image": str(source)},
                                             {"type": "text", "text": QUESTION}]}]
    return model.chat(messages, max_new_tokens=TOKENS).text


def _wait_ready(http, uids, timeout_s=READY_S) -> list[dict]:
    deadline, rows = time.monotonic() + timeout_s, []
    while time.monotonic() < deadline:
        rows = http.get("/v1/studies").json()["data"]
        states = {r["uid"]: r["status"] for r in rows}
        failed = [s for s in states.values() if s.startswith("failed")]
        assert not failed, states
        if set(uids) <= set(states) and all(states[u] == "ready" for u in uids):
            return rows
        time.sleep(0.5)
    pytest.fail(f"studies not ready in {timeout_s} s: {[(r['uid'][-8:], r['status']) for r in rows]}")


def test_pacs_and_modality_push_studies_that_are_prepared_and_answered_from_the_prefix(
        tiny_bundle_f32, reference, tmp_path, caplog):
    import medgemma_edge
    from medgemma_edge.node.config import NodeConfig
    from medgemma_edge.server import ServerConfig, ServerThread, build_app
    from medgemma_edge.server.backend import LocalBackend

    caplog.set_level(logging.INFO)
    ct_study, xray_study = generate_uid(), generate_uid()
    ct_files = _ct_series(tmp_path / "ct", ct_study)
    xray_file = _xray(tmp_path / "xray.dcm", xray_study)
    modality_file = get_testdata_file("CT_small.dcm")  # storescu's study: pydicom's own CT slice
    modality_study = str(pydicom.dcmread(modality_file).StudyInstanceUID)
    sent = {ct_study: ct_files, xray_study: [xray_file], modality_study: [modality_file]}

    spool = tmp_path / "spool"
    node_config = NodeConfig(port=free_port(), stable_s=1.0, spool=spool)
    model = medgemma_edge.load(tiny_bundle_f32, threads=THREADS, context=CONTEXT, image_cache_dir=spool / "image-cache")
    app = build_app(LocalBackend(model), ServerConfig(), node_config)
    with Orthanc(tmp_path / "orthanc", modalities={"mge": ("MGE", "127.0.0.1", node_config.port)}) as pacs, \
            ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=120) as http:
        ids = [pacs.upload(p.read_bytes()) for p in [*ct_files, xray_file]]
        pushed = pacs.send("mge", ids)
        print("Orthanc store:", {k: v for k, v in pushed.items() if k != "ParentResources"})
        assert pushed.get("FailedInstancesCount", 0) == 0 and pushed.get("InstancesCount") == len(ids), pushed
        run = storescu([modality_file], node_config.port, "MGE")
        assert run.returncode == 0, run.stderr

        # every instance in the spool, its bytes as sent (pixels and UID), and its file as recorded
        node = app.state.medgemma.node
        for study_uid, files in sent.items():
            held = node.spool.instances(study_uid)
            assert len(held) == len(files), (study_uid[-8:], len(held), len(files))
            assert sorted(_pixels_sha(i.path) for i in held) == sorted(_pixels_sha(str(f)) for f in files)
            for inst in held:
                assert hashlib.sha256(inst.path.read_bytes()).hexdigest() == inst.sha256

        rows = _wait_ready(http, list(sent))
        text = json.dumps(rows)
        assert not any(marker in text for marker in PATIENT_MARKERS.values()), "patient values without a key"

        # Questions in the order the studies were prepared: each one's prefix comes from disk.
        order = [r["uid"] for r in sorted(rows, key=lambda r: r["uid"] != ct_study)]
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        sources = {ct_study: tmp_path / "ct", xray_study: xray_file, modality_study: modality_file}
        answers = set()
        for uid in order:
            reply = client.chat.completions.create(model="any", max_tokens=TOKENS, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"medgemma-edge:study/{uid}"}},
                                             {"type": "text", "text": QUESTION}]}])
            stats = reply.model_extra["medgemma_edge"]["stats"]
            want = _ask_reference(reference, sources[uid])
            got = reply.choices[0].message.content
            print(f"{uid[-8:]}: restored {stats['restored_tokens']} of {stats['prompt_tokens']}, encode "
                  f"{stats['image_encode_s']} s, {stats['images_from_cache']}/{stats['images']} images cached; "
                  f"answer {got!r}, ask {want!r}")
            assert stats["restored_tokens"] > 0 and stats["images_from_cache"] == stats["images"] >= 1
            assert stats["image_encode_s"] < 0.05
            assert got == want
            answers.add(got)
        assert len(answers) > 1, "every study got the same answer: the comparison would prove nothing"

    logged = "\n".join(r.getMessage() for r in caplog.records)
    for marker in PATIENT_MARKERS.values():
        assert marker not in logged, f"{marker!r} reached the log"
