"""box_2d answers reach server clients: `boxes` on the message (streamed: the final chunk's delta),
each box also in pixels of the one picture sent, for the fit its view was made with.

A stub backend answers a fixed box (the tiny random model would never write one); the picture is
300×201, so padding puts (300 − 201) // 2 = 49 black rows on top and the mapping is not a scale.
One test goes through LocalBackend and a real bundle, with Model.stream answering the box.
"""

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from medgemma_edge.runtime.reply import Response, Stats
from medgemma_edge.server import ServerConfig, ServerThread, build_app
from tests.dicom_helpers import image_dataset, save, slice_pixels

ANSWER = 'Found:\n```json\n[{"box_2d": [500, 250, 750, 750], "label": "nodule"}]\n```'
W, H = 300, 201
# (y0, x0, y1, x1) = (500, 250, 750, 750) thousandths of the square view, back on the 300×201 picture:
PAD = [75.0, 101.0, 225.0, 176.0]  # side 300, 49 rows on top: y = b/1000·300 − 49
STRETCH = [75.0, 100.5, 225.0, 150.75]  # y = b/1000·201
WANT = {"label": "nodule", "box_2d": [500.0, 250.0, 750.0, 750.0], "image_size": [W, H]}


class BoxBackend:
    """Answers `answer` in pieces; its own fit is `fit` (what a request without one gets)."""
    model_id, notice = "boxes", None

    def __init__(self, fit="pad"):
        self.fit, self.answer = fit, ANSWER

    def chat(self, messages, options, cancelled):
        for i in range(0, len(self.answer), 7):
            yield Response(self.answer[i:i + 7], i, 10, i + 1)
        yield Response("", None, 10, len(self.answer), "stop", None, Stats())

    def prepare(self, messages, options):
        pass


def _png(size=(W, H)) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        out, format="PNG")
    return out.getvalue()


def _url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _ask(*urls):
    return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in urls),
                                         {"type": "text", "text": "Where is the nodule? Give box_2d."}]}]


@pytest.fixture(scope="module")
def stub():
    return BoxBackend()


@pytest.fixture(scope="module")
def running(stub):
    with ServerThread(build_app(stub, ServerConfig(max_images=4))) as server:
        yield server


@pytest.fixture
def client(running):
    return openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _check(got, xyxy):
    assert got is not None and len(got) == 1, got
    worst = max(abs(a - b) for a, b in zip(got[0]["xyxy"], xyxy))
    print(f"boxes {got} want xyxy {xyxy}: worst difference {worst}")
    assert {k: v for k, v in got[0].items() if k != "xyxy"} == WANT and worst == 0


@pytest.mark.parametrize("fit,xyxy", [(None, PAD), ("stretch", STRETCH)])
def test_plain_answer_carries_boxes_on_the_original(client, fit, xyxy):
    extra = {"extra_body": {"medgemma_edge": {"fit": fit}}} if fit else {}
    reply = client.chat.completions.create(model="any", messages=_ask(_url(_png())), **extra)
    message = reply.choices[0].message
    assert message.content == ANSWER
    _check(message.model_extra.get("boxes"), xyxy)


def test_streamed_answer_carries_boxes_on_the_final_chunk(client):
    chunks = list(client.chat.completions.create(model="any", messages=_ask(_url(_png())), stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1
    _check(final[0].choices[0].delta.model_extra.get("boxes"), PAD)
    assert all("boxes" not in (c.choices[0].delta.model_extra or {}) for c in chunks if c not in final)


def test_an_uploaded_picture_and_a_single_dicom_file_map_too(client, running, tmp_path):
    with httpx.Client(base_url=running.url, timeout=60) as http:
        upload = http.post("/v1/images", json={"url": _url(_png())}).json()
    reply = client.chat.completions.create(model="any", messages=_ask(upload["url"]))
    _check(reply.choices[0].message.model_extra.get("boxes"), PAD)
    dicom = save(image_dataset(np.zeros((H, W), np.int16)), tmp_path / "one.dcm").read_bytes()
    reply = client.chat.completions.create(model="any", messages=_ask(_url(dicom, "application/dicom")))
    _check(reply.choices[0].message.model_extra.get("boxes"), PAD)


def test_no_boxes_for_two_pictures_a_series_or_an_answer_without_one(client, stub, tmp_path):
    series = [save(image_dataset(slice_pixels(k), instance=k + 1), tmp_path / f"s{k}.dcm").read_bytes()
              for k in range(3)]
    for what, messages in (("two pictures", _ask(_url(_png()), _url(_png((64, 80))))),
                           ("a series", _ask(*(_url(s, "application/dicom") for s in series))),
                           ("no picture", [{"role": "user", "content": "box_2d?"}])):
        reply = client.chat.completions.create(model="any", messages=messages)
        assert "boxes" not in reply.choices[0].message.model_extra, what
    stub.answer = "No nodule."
    try:
        reply = client.chat.completions.create(model="any", messages=_ask(_url(_png())))
    finally:
        stub.answer = ANSWER
    assert reply.choices[0].message.content == "No nodule." and "boxes" not in reply.choices[0].message.model_extra


def test_local_backend_maps_with_the_models_fit(tiny_bundle_f32, monkeypatch):
    """LocalBackend over a real bundle loaded with fit="stretch": a request naming no fit is mapped
    with the model's own."""
    import medgemma_edge
    from medgemma_edge.runtime.model import Model
    from medgemma_edge.server.backend import LocalBackend

    def answer_a_box(self, messages, **options):
        yield Response(ANSWER, 1, 10, 1)
        yield Response("", None, 10, 1, "stop", None, Stats())

    monkeypatch.setattr(Model, "stream", answer_a_box)
    backend = LocalBackend(medgemma_edge.load(tiny_bundle_f32, threads=2, context=1024, fit="stretch"))
    with ServerThread(build_app(backend, ServerConfig())) as server:
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": _ask(_url(_png()))}, timeout=60)
    assert r.status_code == 200, r.text
    _check(r.json()["choices"][0]["message"].get("boxes"), STRETCH)
