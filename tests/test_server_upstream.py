"""`serve --upstream`: our image path in front of another OpenAI-compatible engine.

The engine here is llama-cpp-python's own OpenAI server (`python -m llama_cpp.server`, chat format
mtmd) holding the tiny bundle's two GGUF files, in a subprocess on a free loopback port. The
backend must hand it exactly our 896² view of a DICOM file; what the engine then does with the
text (its chat template, its sampler) is its own, and the parity test below accounts for it token
by token. The wire's error shapes and the stream's usage/thought handling are checked against a
mock transport, without the engine.
"""

from __future__ import annotations

import base64
import difflib
import io
import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from medgemma_edge.runtime import chat as chatfmt
from medgemma_edge.runtime.errors import BusyError, InputError, MedGemmaEdgeError
from medgemma_edge.runtime.preprocess import model_view
from medgemma_edge.runtime.sources import load_pictures
from medgemma_edge.server.upstream import UpstreamBackend, UpstreamError, upstream_base
from tests.dicom_helpers import write_series

THREADS = 2  # the same for the engine and our model, so both sum in the same order
READY_S = 180.0  # the engine's start (imports, model load) on a slow machine
QUESTION = "Describe this CT slice."
TOKENS = 16
NO_PENALTY = {"repeat_penalty": 1.0}  # llama-cpp-python's default 1.1 would bend a greedy answer


def ct_small() -> bytes:
    import pydicom.data

    with open(pydicom.data.get_testdata_file("CT_small.dcm"), "rb") as fh:
        return fh.read()


def ask(image) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]


def decoded(data_url: str) -> np.ndarray:
    head, data = data_url.split(",", 1)
    assert head == "data:image/png;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def image_urls(message: dict) -> list[str]:
    return [p["image_url"]["url"] for p in message["content"] if p["type"] == "image_url"]


# -- without an engine -----------------------------------------------------------------------------
def test_upstream_url_forms():
    for typed in ("http://lb:8000", "http://lb:8000/", "http://lb:8000/v1", "http://lb:8000/v1/",
                  "http://lb:8000/v1/chat/completions"):
        assert upstream_base(typed) == "http://lb:8000/v1", typed
    assert upstream_base("https://h/ollama/v1") == "https://h/ollama/v1"
    for bad in ("", "lb:8000", "ftp://lb/v1", None):
        with pytest.raises(InputError):
            upstream_base(bad)


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_series_goes_as_our_views_each_before_its_label(tmp_path, modality):
    """A series: every kept slice as its own PNG, followed by `SLICE i`, the question last — and
    each PNG decodes to model_view's bytes (MR views are gray and travel as one channel)."""
    folder = tmp_path / "series"
    write_series(folder, 5, modality=modality)
    backend = UpstreamBackend("http://127.0.0.1:9/v1", model="m", threads=THREADS)
    messages = [{"role": "system", "content": "You are an expert radiologist."},
                {"role": "user", "content": [{"type": "text", "text": "Slices:"}, {"type": "image", "image": str(folder)},
                                             {"type": "text", "text": "Any bleed?"}]}]
    sent = backend.upstream_messages(messages, {"max_slices": 3, "think": True})
    assert sent[0] == {"role": "system", "content": chatfmt.THINK_PREFIX + "You are an expert radiologist."}
    kinds = [p["type"] if p["type"] == "image_url" else p["text"] for p in sent[1]["content"]]
    assert kinds == ["Slices:", "image_url", "SLICE 1", "image_url", "SLICE 2", "image_url", "SLICE 3", "Any bleed?"]
    want = model_view(load_pictures(str(folder), max_slices=3), 896, "pad", threads=THREADS)
    got = np.stack([decoded(u) for u in image_urls(sent[1])])
    assert got.shape == want.shape == (3, 896, 896, 3)
    assert np.array_equal(got, want), f"{np.count_nonzero(got != want)} bytes differ"
    png = base64.b64decode(image_urls(sent[1])[0].split(",", 1)[1])
    assert Image.open(io.BytesIO(png)).mode == ("L" if modality == "MR" else "RGB")


def test_prepare_encodes_once_and_chat_finds_it():
    backend = UpstreamBackend("http://127.0.0.1:9/v1", model="m", threads=THREADS)
    backend.prepare(ask(ct_small()), {})
    first = backend.encode_images(ct_small(), fit="pad", window=None, max_slices=85)
    assert backend.encode_images(ct_small(), fit="pad", window=None, max_slices=85) is first
    assert backend.encode_images(ct_small(), fit="stretch", window=None, max_slices=85) is not first


def mocked(handler) -> UpstreamBackend:
    backend = UpstreamBackend("http://upstream.test/v1", model="m")
    backend.client = httpx.Client(base_url=backend.base_url, transport=httpx.MockTransport(handler))
    return backend


def sse(*chunks) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b": ping\n\ndata: [DONE]\n\n"


def test_stream_usage_and_thought_reach_the_last_response():
    def handler(request):
        body = json.loads(request.content)
        assert body["stream"] and body["stream_options"] == {"include_usage": True} and body["top_k"] == 5
        pieces = ["<unused94>thought\nlooks", " fine<unused95>", "No", " bleed."]
        chunks = [{"choices": [{"delta": {"content": p}, "finish_reason": None}]} for p in pieces]
        chunks += [{"choices": [{"delta": {}, "finish_reason": "stop"}]},
                   {"choices": [], "usage": {"prompt_tokens": 290, "completion_tokens": 9}}]
        return httpx.Response(200, content=sse(*chunks), headers={"content-type": "text/event-stream"})

    out = list(mocked(handler).chat([{"role": "user", "content": "Bleed?"}], {"top_k": 5}, lambda: False))
    last = out[-1]
    assert "".join(r.text for r in out) == "No bleed."
    assert (last.finish_reason, last.thought, last.prompt_tokens, last.completion_tokens) == ("stop", "looks fine", 290, 9)
    assert last.stats.prompt_tokens == 290 and last.stats.images == 0


@pytest.mark.parametrize("status, payload, error, says", [
    (400, {"error": {"message": "Prompt exceeds n_ctx: 5000 > 4096", "type": "invalid_request_error"}},
     InputError, "Prompt exceeds n_ctx"),
    (422, {"detail": [{"msg": "field required"}]}, InputError, "field required"),
    (429, {"error": "server busy"}, BusyError, "busy"),
    (401, {"error": {"message": "bad key"}}, UpstreamError, "key"),
    (500, {"error": {"message": "CUDA out of memory\n  File \"/srv/x.py\", line 3"}}, UpstreamError, "CUDA out of memory"),
])
def test_upstream_refusals_become_our_errors(status, payload, error, says):
    backend = mocked(lambda request: httpx.Response(status, json=payload))
    with pytest.raises(error) as caught:
        list(backend.chat([{"role": "user", "content": "hi"}], {}, lambda: False))
    message = str(caught.value)
    assert says in message and "\n" not in message and "/srv/x.py" not in message
    assert isinstance(caught.value, MedGemmaEdgeError)


def test_unreachable_upstream_is_one_line():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = UpstreamBackend(f"http://127.0.0.1:{port}/v1")
    with pytest.raises(UpstreamError, match="cannot reach the upstream engine") as caught:
        list(backend.chat([{"role": "user", "content": "hi"}], {}, lambda: False))
    assert "\n" not in str(caught.value)


# -- llama-cpp-python's server as the upstream -----------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def upstream(tiny_bundle_f32, tmp_path_factory):
    for module in ("fastapi", "sse_starlette", "starlette_context", "pydantic_settings", "uvicorn"):
        pytest.importorskip(module, reason="llama_cpp.server needs the dev extra's server packages")
    files = {f["role"]: f["path"] for f in json.loads((tiny_bundle_f32 / "manifest.json").read_text())["files"]}
    port = free_port()
    log = tmp_path_factory.mktemp("upstream") / "llama_cpp_server.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(tiny_bundle_f32 / files["text"]),
           "--clip_model_path", str(tiny_bundle_f32 / files["vision"]), "--chat_format", "mtmd",
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
           "--n_threads", str(THREADS), "--n_threads_batch", str(THREADS)]
    with open(log, "wb") as out:
        engine = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + READY_S
        while True:
            assert engine.poll() is None, f"llama_cpp.server exited:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(url + "/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"llama_cpp.server not ready in {READY_S} s:\n{log.read_text()[-3000:]}"
            time.sleep(0.25)
        yield url
    finally:
        engine.terminate()
        try:
            engine.wait(15)
        except subprocess.TimeoutExpired:
            engine.kill()
            engine.wait()


@pytest.fixture(scope="module")
def local(tiny_bundle_f32):
    import medgemma_edge

    return medgemma_edge.load(tiny_bundle_f32, threads=THREADS)


def mtmd_layout(parts: list) -> list:
    """Our prompt parts as the engine lays them out: its GGUF chat template joins the trimmed
    items, and llama.cpp's mtmd writes Gemma 3's image as `<start_of_image>`, the embeddings,
    `<end_of_image>` — without the blank lines transformers puts around the block."""
    def blank_beside_image(i: int) -> bool:
        before = parts[i + 1] if i + 1 < len(parts) else None
        after = parts[i - 1] if i > 0 else None
        return (parts[i] == "\n\n" and type(parts[i]) is str
                and (before is chatfmt.START_IMAGE or after is chatfmt.END_IMAGE))

    return [p for i, p in enumerate(parts) if not blank_beside_image(i)]


def test_upstream_gets_our_view_and_answers_as_its_prompt_allows(upstream, local):
    dcm = ct_small()
    backend = UpstreamBackend(upstream, threads=THREADS, extra_body=NO_PENALTY)
    sent = []
    backend.client.event_hooks["request"].append(
        lambda request: sent.append(json.loads(request.read())) if request.method == "POST" else None)
    options = {"max_tokens": TOKENS, "temperature": 0.0}
    out = list(backend.chat(ask(dcm), options, lambda: False))
    answer, last = "".join(r.text for r in out), out[-1]

    # 1. The engine received exactly our view: model_view of the DICOM, byte for byte.
    (url,) = image_urls(sent[0]["messages"][0])
    want = model_view(load_pictures(dcm), 896, "pad", threads=THREADS)[0]
    got = decoded(url)
    assert got.shape == want.shape == (896, 896, 3)
    assert np.array_equal(got, want), f"{np.count_nonzero(got != want)} of {want.size} bytes differ"

    # 2. Token accounting: our prompt and the engine's differ by its image-block layout only.
    joined = httpx.post(upstream + "/chat/completions", json=backend.request_body(ask(dcm), options), timeout=120).json()
    theirs_n = joined["usage"]["prompt_tokens"]
    reply = local.chat(ask(dcm), max_new_tokens=TOKENS, temperature=0.0)
    expanded, _ = chatfmt.expand_images(ask(dcm), load_pictures)
    parts = chatfmt.prompt_parts(expanded)
    ours = chatfmt.tokenize_prompt(parts, local.engine.tokenize)
    theirs = chatfmt.tokenize_prompt(mtmd_layout(parts), local.engine.tokenize)
    piece = lambda t: local.engine.piece(t, special=True).decode("utf-8", "replace")
    changes = [(op, [piece(t) for t in ours[a:b]], [piece(t) for t in theirs[c:d]])
               for op, a, b, c, d in difflib.SequenceMatcher(a=ours, b=theirs, autojunk=False).get_opcodes()
               if op != "equal"]
    print(f"\nprompt tokens: ours {reply.prompt_tokens}, upstream {theirs_n} (usage); changes ours→upstream: {changes}")
    print(f"answers: ours {reply.text!r}\n         upstream {answer!r} (joined: {joined['choices'][0]['message']['content']!r})")
    assert reply.prompt_tokens == len(ours)
    assert theirs_n == len(theirs), "the engine's prompt is not our prompt with its image layout"
    assert changes and all("".join(a + b).strip() == "" for _, a, b in changes), "more than blank lines differ"

    # 3. The answers. Same model, same view, a prompt one blank-line token apart: with this tiny
    # random model the greedy answers agree; a real model may part ways after a few tokens.
    assert answer.strip() and answer == joined["choices"][0]["message"]["content"]
    assert answer == reply.text, f"the engine answered {answer!r}, our runtime {reply.text!r}"
    text_only = local.chat([{"role": "user", "content": QUESTION}], max_new_tokens=TOKENS).text
    assert text_only != reply.text, "the answer does not depend on the image: the comparison would prove nothing"

    # 4. What the last response says: the engine's counts where it sends them.
    assert (last.finish_reason, last.completion_tokens) == ("length", TOKENS)
    assert last.stats.images == 1 and last.stats.preprocess_ms > 0 and last.stats.ttft_s > 0
    assert last.prompt_tokens in (0, theirs_n)  # llama-cpp-python's stream carries no usage: 0


def test_cancel_stops_while_the_engine_is_still_silent(upstream):
    """A client that leaves during the engine's prefill frees our worker at once, and the engine
    answers the next request."""
    backend = UpstreamBackend(upstream, threads=THREADS, extra_body=NO_PENALTY)
    gone = threading.Event()
    backend.prepare(ask(ct_small()), {"fit": "stretch"})  # our image work done: what is left is the engine's
    t0 = time.perf_counter()
    threading.Timer(0.3, gone.set).start()
    out = list(backend.chat(ask(ct_small()), {"max_tokens": 400, "fit": "stretch"}, gone.is_set))
    waited = time.perf_counter() - t0
    assert waited < 0.3 + 1.5, f"cancelled after {waited:.2f} s"
    assert all(r.finish_reason is None for r in out)
    again = list(backend.chat([{"role": "user", "content": "hi"}], {"max_tokens": 2}, lambda: False))
    assert again[-1].finish_reason in ("stop", "length")


def test_our_server_in_front_of_the_engine(upstream, local):
    """The whole route: the openai client → our server (UpstreamBackend) → the engine, with a
    DICOM data URL; the answer is the one the backend gives when called directly."""
    from medgemma_edge.server import ServerConfig, ServerThread, build_app
    openai = pytest.importorskip("openai")
    backend = UpstreamBackend(upstream, threads=THREADS, extra_body=NO_PENALTY)
    deadline = time.monotonic() + 10
    while backend.model_id == "upstream" and time.monotonic() < deadline:  # the name is learnt in the background
        time.sleep(0.05)
    assert backend.model_id == httpx.get(upstream + "/models", timeout=10).json()["data"][0]["id"]
    direct = "".join(r.text for r in backend.chat(ask(ct_small()), {"max_tokens": TOKENS}, lambda: False))
    dicom_url = "data:application/dicom;base64," + base64.b64encode(ct_small()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": dicom_url}},
                                             {"type": "text", "text": QUESTION}]}]
    with ServerThread(build_app(backend, ServerConfig())) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == [backend.model_id]
        joined = client.chat.completions.create(model=backend.model_id, messages=messages, max_tokens=TOKENS,
                                                temperature=0)
        stream = client.chat.completions.create(model=backend.model_id, messages=messages, max_tokens=TOKENS,
                                                temperature=0, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    print(f"\nthrough our server: {joined.choices[0].message.content!r}")
    assert joined.choices[0].message.content == streamed == direct
    assert joined.usage.completion_tokens == TOKENS
    stats = joined.model_extra["medgemma_edge"]["stats"]
    assert stats["images"] == 1 and stats["preprocess_ms"] > 0
