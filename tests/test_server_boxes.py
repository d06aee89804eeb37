"""box_2d answers reach server clients: `boxes` on the message (streamed: the final chunk's delta),
each box also in pixels of the one picture sent, for the fit its view was made with.

The mapping happens where the picture is decoded: the model's last `Response` carries the boxes
(runtime/model.py with runtime/boxes.answer_boxes), and the server shows what it carries. So the
mapping is tested through LocalBackend over a real bundle (its decoding loop answers a fixed box,
the tiny random model would never write one), counting picture decodes: one per picture, none
again for the boxes. The picture is 300×201, so padding puts (300 − 201) // 2 = 49 black rows on
top and the mapping is not a scale. A stub backend checks where the server puts them.
"""

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from medgemma_edge.runtime.boxes import boxes_on_original
from medgemma_edge.runtime.reply import Response, Stats
from medgemma_edge.server import ServerConfig, ServerThread, build_app
from tests.box_answer import answer_with, count_decodes
from tests.dicom_helpers import image_dataset, save, slice_pixels

ANSWER = 'Found:\n```json\n[{"box_2d": [500, 250, 750, 750], "label": "nodule"}]\n```'
W, H = 300, 201
# (y0, x0, y1, x1) = (500, 250, 750, 750) thousandths of the square view, back on the 300×201 picture:
PAD = [75.0, 101.0, 225.0, 176.0]  # side 300, 49 rows on top: y = b/1000·300 − 49
STRETCH = [75.0, 100.5, 225.0, 150.75]  # y = b/1000·201
WANT = {"label": "nodule", "box_2d": [500.0, 250.0, 750.0, 750.0], "image_size": [W, H]}


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


def _check(got, xyxy):
    assert got is not None and len(got) == 1, got
    worst = max(abs(a - b) for a, b in zip(got[0]["xyxy"], xyxy))
    print(f"boxes {got} want xyxy {xyxy}: worst difference {worst}")
    assert {k: v for k, v in got[0].items() if k != "xyxy"} == WANT and worst == 0


# -- where the server puts the boxes the backend's last Response carries ------------------------

class BoxBackend:
    """Answers ANSWER in pieces; its last Response carries `boxes` (as a backend maps them)."""
    model_id, notice = "boxes", None

    def __init__(self):
        self.boxes = boxes_on_original(ANSWER, H, W, "pad")

    def chat(self, messages, options, cancelled):
        for i in range(0, len(ANSWER), 7):
            yield Response(ANSWER[i:i + 7], i, 10, i + 1)
        yield Response("", None, 10, len(ANSWER), "stop", None, Stats(), self.boxes)

    def prepare(self, messages, options):
        pass


@pytest.fixture(scope="module")
def stub():
    return BoxBackend()


@pytest.fixture(scope="module")
def stub_client(stub):
    with ServerThread(build_app(stub, ServerConfig(max_images=4))) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_plain_answer_carries_the_backends_boxes(stub_client, stub):
    message = stub_client.chat.completions.create(model="any", messages=_ask(_url(_png()))).choices[0].message
    assert message.content == ANSWER
    _check(message.model_extra.get("boxes"), PAD)
    stub.boxes = []
    try:
        message = stub_client.chat.completions.create(model="any", messages=_ask(_url(_png()))).choices[0].message
    finally:
        stub.boxes = boxes_on_original(ANSWER, H, W, "pad")
    assert "boxes" not in message.model_extra


def test_streamed_answer_carries_boxes_on_the_final_chunk(stub_client):
    chunks = list(stub_client.chat.completions.create(model="any", messages=_ask(_url(_png())), stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1
    _check(final[0].choices[0].delta.model_extra.get("boxes"), PAD)
    assert all("boxes" not in (c.choices[0].delta.model_extra or {}) for c in chunks if c not in final)


# -- the mapping, through the model ------------------------------------------------------------

@pytest.fixture(scope="module")
def local(tiny_bundle_f32):
    """LocalBackend over the tiny bundle loaded with fit="stretch" (a request naming none uses it)."""
    import medgemma_edge
    from medgemma_edge.server.backend import LocalBackend

    backend = LocalBackend(medgemma_edge.load(tiny_bundle_f32, threads=2, context=2048, fit="stretch"))
    with ServerThread(build_app(backend, ServerConfig(max_images=4))) as server:
        yield server


@pytest.fixture
def boxed(monkeypatch):
    answer_with(monkeypatch, ANSWER, 7)
    return count_decodes(monkeypatch)


def _boxes(server, messages, **medgemma):
    body = {"messages": messages, **({"medgemma_edge": medgemma} if medgemma else {})}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert message["content"] == ANSWER
    return message.get("boxes")


@pytest.mark.parametrize("fit,xyxy", [(None, STRETCH), ("pad", PAD)])
def test_boxes_map_with_the_fit_the_view_was_made_with_from_one_decode(local, boxed, fit, xyxy):
    """No fit in the request: the model's own (stretch); "pad" named: pad. The picture is decoded
    once, for the prompt."""
    png = _png()
    _check(_boxes(local, _ask(_url(png)), **({"fit": fit} if fit else {})), xyxy)
    assert boxed == {f"{len(png)} bytes": 1}, boxed


def test_an_uploaded_picture_and_a_single_dicom_file_map_too(local, boxed, tmp_path):
    with httpx.Client(base_url=local.url, timeout=60) as http:
        upload = http.post("/v1/images", json={"url": _url(_png())}).json()
    _check(_boxes(local, _ask(upload["url"]), fit="pad"), PAD)
    assert sum(boxed.values()) == 1, boxed  # at upload; the chat reuses the upload's picture
    dicom = save(image_dataset(np.zeros((H, W), np.int16)), tmp_path / "one.dcm").read_bytes()
    _check(_boxes(local, _ask(_url(dicom, "application/dicom")), fit="pad"), PAD)
    assert boxed["dicom slices"] == 1, boxed


def test_no_boxes_for_two_pictures_a_series_or_no_picture(local, boxed, tmp_path):
    series = [save(image_dataset(slice_pixels(k), instance=k + 1), tmp_path / f"s{k}.dcm").read_bytes()
              for k in range(2)]
    for what, messages in (("two pictures", _ask(_url(_png()), _url(_png((64, 80))))),
                           ("a series", _ask(*(_url(s, "application/dicom") for s in series))),
                           ("no picture", [{"role": "user", "content": "box_2d?"}])):
        assert _boxes(local, messages) is None, what
    assert boxed["dicom slices"] == 2 and sum(boxed.values()) == 4, boxed
