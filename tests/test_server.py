"""The HTTP server, end to end: a real uvicorn on a free loopback port, the real `openai` client
where it fits, the tiny random bundle behind it (greedy, so a streamed answer must equal the plain
one). Raw httpx where the client would hide what is checked (status codes, headers, bodies)."""

import base64
import io
import logging
import threading
import time

import httpx
import numpy as np
import openai
import pydicom
import pytest
from click.testing import CliRunner
from PIL import Image
from pydicom.data import get_testdata_file

from medgemma_edge.runtime.chat_template import ChatTemplate
from medgemma_edge.runtime.reply import Response, Stats
from medgemma_edge.server import ServerConfig, ServerThread, build_app
from medgemma_edge.server.backend import LocalBackend
from tests.dicom_helpers import PATIENT_MARKERS, image_dataset, save, slice_pixels

LIMITS = dict(max_images=4, max_body_mb=2)  # small, so the tests can cross them cheaply
CT_SMALL = get_testdata_file("CT_small.dcm")


def _png(seed=0, size=(80, 64)) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        out, format="PNG")
    return out.getvalue()


def _url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _dicom_url(data: bytes) -> str:
    return _url(data, "application/dicom")


def _part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def _ask(*images, text="Describe the image."):
    return [{"role": "user", "content": [*(_part(u) for u in images), {"type": "text", "text": text}]}]


def _series(tmp_path, n=3) -> list[bytes]:
    """n CT slices of one series, patient tags set (dicom_helpers), written in shuffled order."""
    order = [2, 0, 1, 3, 4][:n]
    return [save(image_dataset(slice_pixels(k), instance=k + 1), tmp_path / f"s{k}.dcm").read_bytes()
            for k in order]


@pytest.fixture(scope="module")
def backend(tiny_bundle_f32):
    import medgemma_edge

    return LocalBackend(medgemma_edge.load(tiny_bundle_f32, threads=2, context=2048))


@pytest.fixture(scope="module")
def server(backend):
    with ServerThread(build_app(backend, ServerConfig(**LIMITS))) as running:
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def _plain_and_streamed(client, messages, **options):
    plain = client.chat.completions.create(model="any", messages=messages, max_tokens=8, **options)
    chunks = list(client.chat.completions.create(model="any", messages=messages, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}, **options))
    return plain, chunks


@pytest.mark.parametrize("kind", ["png", "dicom"])
def test_plain_and_streamed_answers_agree(client, kind):
    url = _url(_png()) if kind == "png" else _dicom_url(open(CT_SMALL, "rb").read())
    plain, chunks = _plain_and_streamed(client, _ask(url))
    text = plain.choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    print(f"{kind}: plain {text!r} streamed {streamed!r}")
    assert streamed == text and plain.choices[0].finish_reason in ("stop", "length")
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens
    extras = plain.model_extra["medgemma_edge"]
    assert extras["stats"]["images"] == 1 and extras["thought"] is None
    assert finish[0].model_extra["medgemma_edge"]["stats"]["images"] == 1
    assert plain.usage.prompt_tokens == extras["stats"]["prompt_tokens"] > 256  # the image's 256 slots


def test_series_parts_become_one_volume_with_slice_labels(client, tmp_path, monkeypatch):
    prompts = []
    render = ChatTemplate.parts  # every prompt is rendered by the bundle's template (runtime/chat_template.py)
    monkeypatch.setattr(ChatTemplate, "parts", lambda *a, **k: prompts.append(render(*a, **k)) or prompts[-1])
    reply = client.chat.completions.create(model="any", max_tokens=2, messages=_ask(
        *map(_dicom_url, _series(tmp_path)), text="Any bleed?"))
    assert reply.model_extra["medgemma_edge"]["stats"]["images"] == 3
    prompt = "".join(prompts[-1])
    assert [prompt.find(f"SLICE {i}") for i in (1, 2, 3)] == sorted(prompt.find(f"SLICE {i}") for i in (1, 2, 3))
    assert prompt.count("SLICE ") == 3 and "SLICE 4" not in prompt, prompt.replace("<image_soft_token>", "")


@pytest.mark.parametrize("what,body,status,says", [
    ("remote URL", {"messages": _ask("https://example.org/x.png")}, 400, "never fetches"),
    ("corrupt image", {"messages": _ask(_url(b"\x89PNG\r\n\x1a\n" + b"\0" * 64))}, 400, ""),
    ("corrupt DICOM", {"messages": _ask(_dicom_url(b"\0" * 128 + b"DICM" + b"\x02\x00" * 20))}, 400, ""),
    ("too many images", {"messages": _ask(*[_url(_png(i)) for i in range(5)])}, 400, "too many images"),
    ("prompt longer than the context", {"messages": _ask(text="lung " * 3000)}, 400, "context"),
    ("unknown option", {"messages": _ask(), "medgemma_edge": {"windw": "brain"}}, 400, "windw"),
    ("bad window", {"messages": _ask(), "medgemma_edge": {"window": "nope"}}, 400, "window"),
    ("no messages", {"messages": []}, 400, "messages"),
])
def test_bad_requests_get_openai_errors(http, what, body, status, says):
    r = http.post("/v1/chat/completions", json={"max_tokens": 2, **body})
    error = r.json()["error"]
    print(f"{what}: {r.status_code} {error['message']}")
    assert r.status_code == status and error["type"] == "invalid_request_error" and says in error["message"]
    assert "Traceback" not in r.text


def test_the_client_raises_on_a_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="never fetches"):
        client.chat.completions.create(model="any", messages=_ask("http://pacs.local/x.png"), max_tokens=2)


def test_malformed_json_and_oversized_body(http):
    r = http.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    big = b'{"messages": "' + b"x" * (3 << 20) + b'"}'
    r = http.post("/v1/chat/completions", content=big)
    assert r.status_code == 413 and "--max-body-mb" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: refused while reading
        for _ in range(6):
            yield b"x" * (1 << 19)

    r = http.post("/v1/chat/completions", content=chunked())
    assert r.status_code == 413


def test_models_health_and_unknown_paths(client, http, backend):
    assert [m.id for m in client.models.list()] == [backend.model_id]
    health = http.get("/health").json()
    assert health["status"] in ("ready", "busy") and health["queue"] == 0 and health["model"] == backend.model_id
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"].startswith("no such endpoint")
    assert http.get("/kiosk/..%2Fapp.py").status_code == 404


def test_upload_then_chat_by_id_skips_the_encoder(client, http):
    r = http.post("/v1/images", files={"file": ("xray.png", _png(7), "image/png")})
    assert r.status_code == 200, r.text
    upload = r.json()
    assert upload["url"] == "medgemma-edge:image/" + upload["id"] and len(upload["id"]) == 32
    assert upload["pictures"] == 1 and upload["labels"] == [] and upload["window"] is None
    deadline = time.monotonic() + 60
    while (state := http.get(f"/v1/images/{upload['id']}").json())["status"] == "encoding":
        assert time.monotonic() < deadline, "the upload never finished encoding"
        time.sleep(0.05)
    assert state["status"] == "ready", state
    preview = http.get(upload["preview"])
    assert preview.headers["content-type"] == "image/png" and preview.headers["cache-control"] == "no-store"
    assert Image.open(io.BytesIO(preview.content)).size == (896, 896)
    reply = client.chat.completions.create(model="any", max_tokens=2, messages=_ask(upload["url"]))
    stats = reply.model_extra["medgemma_edge"]["stats"]
    print("chat by id:", stats)
    assert stats["images"] == stats["images_from_cache"] == 1


def test_upload_of_a_series_as_data_urls(http, tmp_path):
    parts = _series(tmp_path, 4)
    r = http.post("/v1/images", json={"urls": [_dicom_url(p) for p in parts], "max_slices": 3})
    assert r.status_code == 200, r.text
    upload = r.json()
    assert upload["pictures"] == 3 and upload["labels"] == ["SLICE 1", "SLICE 2", "SLICE 3"]
    assert upload["window"] == "medgemma-1.5"
    sheet = Image.open(io.BytesIO(http.get(upload["preview"]).content))
    assert sheet.width < 896 * 2  # tiles, not full-size views
    bad = http.post("/v1/images", files={"file": ("x.png", b"not a picture", "image/png")})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert http.get("/v1/images/" + "0" * 32).status_code == 404
    gone = http.post("/v1/chat/completions", json={"messages": _ask("medgemma-edge:image/" + "0" * 32)})
    assert gone.status_code == 400 and "upload it again" in gone.json()["error"]["message"]


def test_a_key_guards_everything_but_health_and_the_page(backend):
    with ServerThread(build_app(backend, ServerConfig(api_key="s3cret"))) as running:
        def models(key):
            return openai.OpenAI(base_url=running.url + "/v1", api_key=key, max_retries=0).models.list()

        with pytest.raises(openai.AuthenticationError):
            models("wrong")
        assert httpx.post(running.url + "/v1/chat/completions", json={}).status_code == 401
        assert models("s3cret").data[0].id == backend.model_id
        assert httpx.get(running.url + "/health").status_code == 200
        page = httpx.get(running.url + "/")  # the page itself is public: it asks for the key
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), page.status_code
        assert "<title>MedGemma Edge</title>" in page.text and 'src="/kiosk/kiosk.js"' in page.text
        assert httpx.get(running.url + "/kiosk/kiosk.js").status_code == 200
        assert "access-control-allow-origin" not in httpx.get(running.url + "/health").headers


def test_non_loopback_host_needs_a_key(tmp_path):
    from medgemma_edge.cli import main

    result = CliRunner().invoke(main, ["serve", "-m", str(tmp_path), "--host", "0.0.0.0"])
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "--api-key-file" in lines[0], result.output
    key = tmp_path / "key"
    key.write_text("")
    result = CliRunner().invoke(main, ["serve", "-m", str(tmp_path), "--api-key-file", str(key)])
    assert result.exit_code == 2 and "empty" in result.output
    key.write_text("s3cret\n")  # with a key the host is allowed; the (empty) bundle folder is what fails
    result = CliRunner().invoke(main, ["serve", "-m", str(tmp_path), "--host", "0.0.0.0", "--api-key-file", str(key)])
    assert result.exit_code == 2 and "--api-key-file" not in result.output and "s3cret" not in result.output


def test_cli_defaults_are_the_config_defaults():
    from medgemma_edge.cli.serve import DEFAULTS
    from medgemma_edge.server import config

    assert DEFAULTS == {"port": config.DEFAULT_PORT, "max_queue": config.MAX_QUEUE,
                        "max_body_mb": config.MAX_BODY_MB, "max_images": config.MAX_IMAGES}


def test_logs_hold_no_prompt_or_patient_tags(client, http, tmp_path, caplog, capfd):
    secret = "Zanzibar-quince-7741"
    dicom = save(image_dataset(slice_pixels(3)), tmp_path / "p.dcm").read_bytes()
    broken = pydicom.dcmread(io.BytesIO(dicom))
    broken.PixelData = broken.PixelData[:10]  # decoding fails: the error path must not quote tags either
    out = io.BytesIO()
    broken.save_as(out, enforce_file_format=True)
    assert PATIENT_MARKERS["PatientName"].encode() in dicom
    caplog.set_level(logging.DEBUG)
    client.chat.completions.create(model="any", max_tokens=3, messages=_ask(_dicom_url(dicom), text=secret))
    list(client.chat.completions.create(model="any", max_tokens=3, stream=True,
                                        messages=_ask(_dicom_url(dicom), text=secret)))
    refused = http.post("/v1/chat/completions", json={"messages": _ask(_dicom_url(out.getvalue()), text=secret)})
    assert refused.status_code == 400
    http.post("/v1/images", files={"file": ("p.dcm", dicom, "application/dicom")})
    server_lines = [r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpcore", "openai"))]
    logged = "\n".join(server_lines) + "\n".join(capfd.readouterr())
    assert "POST /v1/chat/completions 200" in logged and "POST /v1/chat/completions 400" in logged
    for value in [secret, *PATIENT_MARKERS.values()]:
        assert value not in logged and value not in refused.text, value


def test_port_answers_while_the_model_loads(backend):
    def load():
        time.sleep(1.0)
        return backend

    with ServerThread(build_app(load)) as running:
        health = httpx.get(running.url + "/health").json()
        r = httpx.post(running.url + "/v1/chat/completions", json={"messages": _ask()})
        assert health["status"] == "loading" and r.status_code == 503 and "loading" in r.text
        deadline = time.monotonic() + 30
        while httpx.get(running.url + "/health").json()["status"] != "ready":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.get(running.url + "/v1/models").json()["data"][0]["id"] == backend.model_id


class SlowBackend:
    """One piece every 10 ms, `max_tokens` of them; counts answers closed before their end."""
    model_id, notice = "slow", None

    def __init__(self):
        self.cut_short = 0

    def chat(self, messages, options, cancelled):
        finished = False
        try:
            for i in range(options["max_tokens"]):
                if cancelled():
                    return
                time.sleep(0.01)
                yield Response("x", i, 1, i + 1)
            finished = True
            yield Response("", None, 1, options["max_tokens"], "length", None, Stats())
        finally:
            self.cut_short += not finished

    def prepare(self, messages, options):
        pass


def test_a_full_queue_answers_429_and_a_client_that_leaves_frees_the_worker():
    backend, answers = SlowBackend(), []
    with ServerThread(build_app(backend, ServerConfig(max_queue=1, cors_origin="http://kiosk.local"))) as running:
        url = running.url + "/v1/chat/completions"
        short = {"max_tokens": 3, "messages": _ask()}
        waiting = threading.Thread(target=lambda: answers.append(httpx.post(url, json=short, timeout=30)))
        with httpx.Client(timeout=30) as leaving:
            with leaving.stream("POST", url, json={"max_tokens": 3000, "stream": True, "messages": _ask()}) as r:
                lines = r.iter_lines()  # kept: a dropped iterator closes the connection when collected
                next(lines)  # answering: 30 s of pieces unless it is stopped
                waiting.start()
                deadline = time.monotonic() + 10
                while httpx.get(running.url + "/health").json()["queue"] != 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                refused = httpx.post(url, json=short)
                assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
                assert int(refused.headers["retry-after"]) >= 1
        t0 = time.monotonic()  # the stream's connection is closed here, mid-answer
        waiting.join(10)
        print(f"the queued request was answered {time.monotonic() - t0:.2f} s after the client left")
        assert answers[0].status_code == 200 and answers[0].json()["choices"][0]["message"]["content"] == "xxx"
        assert backend.cut_short == 1 and time.monotonic() - t0 < 5
        preflight = httpx.options(url, headers={"Origin": "http://kiosk.local", "Access-Control-Request-Method": "POST"})
        assert preflight.headers["access-control-allow-origin"] == "http://kiosk.local"


def test_upload_store_keeps_recent_uploads_by_count_and_bytes():
    from medgemma_edge.runtime.picture import Picture
    from medgemma_edge.server.uploads import UploadStore

    def pictures(kb):
        return [Picture(np.zeros((kb, 1024 // 3, 3), np.uint8))]  # ~kb kB of pixels

    store = UploadStore(max_items=3, max_bytes=100 * 1024)
    a, b, c = (store.add(pictures(30), None) for _ in range(3))
    assert store.get(a.id) is a  # a used: b is now the least recent
    d = store.add(pictures(30), None)  # 4 uploads of 30 kB: over both bounds, b goes
    assert store.get(b.id) is None and len(store) == 3
    e = store.add(pictures(10), None)  # within the bytes, past the count: the least recent (c) goes
    assert store.get(c.id) is None and all(store.get(u.id) is u for u in (a, d, e)) and len(store) == 3
    huge = store.add(pictures(500), None)  # larger than the whole budget: kept, alone
    assert store.get(huge.id) is huge and len(store) == 1 and store.get(e.id) is None


def test_each_server_module_imports_only_its_own_room():
    """The store does not import the translator or pydicom; errors.py not the upstream client."""
    import subprocess
    import sys

    code = ("import sys, medgemma_edge.server.uploads, medgemma_edge.server.errors; "
            "print(sorted(m for m in ('medgemma_edge.server.translate', 'pydicom', 'medgemma_edge.server.upstream',"
            " 'openai', 'httpx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
