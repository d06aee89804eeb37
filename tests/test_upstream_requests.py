"""`serve --upstream` without a real engine: URL forms, engine kinds, our views of a series, the
request each kind of engine gets (`FakeEngine`, tests/upstream_helpers.py), refusals before
sending, the stream's last Response (usage, thought, boxes) and how engine failures map to our
errors. The real engine (llama-cpp-python's server) is in tests/test_server_upstream.py.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from medgemma_edge.runtime import chat as chatfmt
from medgemma_edge.runtime.errors import BusyError, InputError, MedGemmaEdgeError
from medgemma_edge.runtime.preprocess import model_view
from medgemma_edge.runtime.sources import load_pictures
from medgemma_edge.server.errors import UpstreamError
from medgemma_edge.server.upstream import UpstreamBackend
from medgemma_edge.server.upstream_request import KINDS, detect_kind, upstream_base
from tests.dicom_helpers import write_series
from tests.upstream_helpers import (QUESTION, SCHEMA, THREADS, FakeEngine, answer, ask, chunks, ct_small, decoded,
                                    free_port, image_urls, one_line_error)


# -- without an engine -----------------------------------------------------------------------------
def test_upstream_url_forms():
    for typed in ("http://lb:8000", "http://lb:8000/", "http://lb:8000/v1", "http://lb:8000/v1/",
                  "http://lb:8000/v1/chat/completions"):
        assert upstream_base(typed) == "http://lb:8000/v1", typed
    assert upstream_base("https://h/ollama/v1") == "https://h/ollama/v1"
    for bad in ("", "lb:8000", "ftp://lb/v1", None):
        with pytest.raises(InputError):
            upstream_base(bad)


def test_engine_kind_from_owned_by_and_port():
    """auto's rule, and the CLI offers exactly the kinds the backend knows (the CLI lists them
    itself so that --help does not import the server)."""
    from medgemma_edge.cli.serve import serve

    seen = {(owner, url): detect_kind(url, owner) for owner, url in [
        ("llamacpp", "http://h:8080/v1"), ("me", "http://h:8000/v1"), ("vllm", "http://h:8000/v1"),
        ("library", "http://h:9999/v1"), ("alibayram", "http://h:11434/v1"), ("organization-owner", "http://h/v1"),
        (None, "http://h:8000/v1")]}
    assert list(seen.values()) == ["llama.cpp", "llama.cpp", "vllm", "ollama", "ollama", "openai", "openai"], seen
    (option,) = [p for p in serve.params if p.name == "upstream_kind"]
    assert tuple(option.type.choices) == KINDS and option.default == "auto"
    with pytest.raises(InputError, match="upstream-kind"):
        UpstreamBackend("http://127.0.0.1:9/v1", model="m", kind="tgi")


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_series_goes_as_our_views_each_before_its_label(tmp_path, modality):
    """A series: every kept slice as its own PNG, followed by `SLICE i`, the question last — and
    each PNG decodes to model_view's bytes (MR views are gray and travel as one channel)."""
    folder = tmp_path / "series"
    write_series(folder, 5, modality=modality)
    backend = UpstreamBackend("http://127.0.0.1:9/v1", model="m", kind="vllm", threads=THREADS)
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
    backend = UpstreamBackend("http://127.0.0.1:9/v1", model="m", kind="vllm", threads=THREADS)
    backend.prepare(ask(ct_small()), {})
    first = backend.encode_images(ct_small(), fit="pad", window=None, max_slices=85)
    assert backend.encode_images(ct_small(), fit="pad", window=None, max_slices=85) is first
    assert backend.encode_images(ct_small(), fit="stretch", window=None, max_slices=85) is not first
    tiny = UpstreamBackend("http://127.0.0.1:9/v1", model="m", kind="vllm", threads=THREADS, cache_mb=0.01)
    once = tiny.encode_images(ct_small(), fit="pad", window=None, max_slices=85)  # larger than the cache
    assert tiny.encode_images(ct_small(), fit="pad", window=None, max_slices=85) is not once


# -- the request each engine gets (FakeEngine) ---------------------------------------------------------
ASKED = {"max_tokens": 40, "temperature": 0.0, "seed": 7, "stop": ["\n\n"], "json_schema": SCHEMA}
SCHEMA_FORM = {"llama.cpp": {"type": "json_object", "schema": SCHEMA},
               "vllm": {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}}
SCHEMA_FORM["ollama"] = SCHEMA_FORM["openai"] = SCHEMA_FORM["vllm"]  # Ollama ≥ 0.5 reads it as `format`


@pytest.mark.parametrize("owned_by, kind", [("me", "llama.cpp"), ("vllm", "vllm"), ("library", "ollama"),
                                            ("someone", "openai")])
def test_each_engine_gets_structured_output_in_its_form(owned_by, kind):
    """The exact body on the wire: auto found the kind from owned_by; the schema goes in the
    engine's form; top_k only where the engine reads it; no Authorization header without a key."""
    top_k = {"top_k": 5} if kind in ("llama.cpp", "vllm") else {}
    messages = [{"role": "system", "content": "Answer in JSON."}, *ask(ct_small())]
    with FakeEngine(owned_by, chunks('{"finding": "normal", "urgent": false}')) as engine:
        backend = UpstreamBackend(engine.url, threads=THREADS)
        out = answer(backend, messages, {**ASKED, **top_k})
        want = {"model": "medgemma", "messages": backend.upstream_messages(messages, {}), "max_tokens": 40,
                "temperature": 0.0, "top_p": 1.0, "seed": 7, "stop": ["\n\n"], **top_k,
                "response_format": SCHEMA_FORM[kind], "stream": True, "stream_options": {"include_usage": True}}
        assert backend.engine_kind() == kind
        assert engine.bodies == [want], json.dumps(engine.bodies)[:2000]
        assert "authorization" not in engine.headers[0]
        assert json.loads("".join(r.text for r in out)) == {"finding": "normal", "urgent": False}

        keyed = UpstreamBackend(engine.url, api_key="s3cret", model="medgemma", kind=kind)
        answer(keyed, [{"role": "user", "content": "hi"}], {})
        assert engine.headers[-1]["authorization"] == "Bearer s3cret"


@pytest.mark.parametrize("kind", ["vllm", "ollama", "openai"])
def test_what_an_engine_would_drop_is_refused_before_sending(kind):
    """tool_choice "auto" (a grammar) and, on Ollama and plain OpenAI, top_k: one line, no request."""
    with FakeEngine(kind) as engine:
        backend = UpstreamBackend(engine.url, model="medgemma", kind=kind)
        with pytest.raises(InputError, match='tool_choice "required"') as caught:
            answer(backend, [{"role": "user", "content": "hi"}], {"grammar": 'root ::= "x"'})
        assert "\n" not in str(caught.value)
        if kind != "vllm":
            with pytest.raises(InputError, match="top_k"):
                answer(backend, [{"role": "user", "content": "hi"}], {"top_k": 5})
        assert engine.bodies == []


def test_stream_usage_and_thought_reach_the_last_response():
    pieces = ["<unused94>thought\nlooks", " fine<unused95>", "No", " bleed."]
    with FakeEngine("vllm", chunks(*pieces, usage={"prompt_tokens": 290, "completion_tokens": 9})) as engine:
        out = answer(UpstreamBackend(engine.url), [{"role": "user", "content": "Bleed?"}], {"top_k": 5})
    last = out[-1]
    assert "".join(r.text for r in out) == "No bleed."
    assert (last.finish_reason, last.thought, last.prompt_tokens, last.completion_tokens) == ("stop", "looks fine", 290, 9)
    assert last.stats.prompt_tokens == 290 and last.stats.images == 0


def test_box_2d_answer_is_mapped_onto_the_picture_as_sent():
    """The engine answers a box on our padded square view; the last Response carries it on the
    original 300×201 picture (the same mapping the local backend makes, runtime/boxes.py)."""
    from medgemma_edge.runtime.boxes import boxes_on_original

    picture = io.BytesIO()
    Image.fromarray(np.full((201, 300, 3), 90, np.uint8)).save(picture, format="PNG")
    answer_text = '[{"box_2d": [500, 250, 750, 750], "label": "nodule"}]'
    with FakeEngine("vllm", chunks(answer_text[:20], answer_text[20:])) as engine:
        out = answer(UpstreamBackend(engine.url), ask(picture.getvalue()), {})
    want = boxes_on_original(answer_text, 201, 300, "pad")
    assert want and out[-1].boxes == want, (out[-1].boxes, want)
    two = [{"role": "user", "content": [{"type": "image", "image": picture.getvalue()},
                                        {"type": "image", "image": ct_small()}, {"type": "text", "text": QUESTION}]}]
    with FakeEngine("vllm", chunks(answer_text)) as engine:  # two pictures: a box names neither
        assert answer(UpstreamBackend(engine.url), two, {})[-1].boxes == []


@pytest.mark.parametrize("status, payload, error, says", [
    (400, {"error": {"message": "Prompt exceeds n_ctx: 5000 > 4096", "type": "invalid_request_error"}},
     InputError, "Prompt exceeds n_ctx"),
    (422, {"detail": [{"loc": ["body", "top_k"], "msg": "Input should be a valid integer", "input": "PATIENT DOE"}]},
     InputError, "body.top_k: Input should be a valid integer"),
    (429, {"error": "server busy"}, BusyError, "busy"),
    (503, {"error": {"message": "loading model"}}, BusyError, "loading model"),
    (401, {"error": {"message": "bad key"}}, UpstreamError, "key"),
    (404, {"error": "model 'medgemma' not found"}, UpstreamError, "--upstream-model"),
    (500, {"error": {"message": "CUDA out of memory\n  File \"/srv/x.py\", line 3"}}, UpstreamError, "CUDA out of memory"),
])
def test_upstream_refusals_become_our_errors(status, payload, error, says):
    with FakeEngine("vllm", (status, payload)) as engine:
        with pytest.raises(error) as caught:
            answer(UpstreamBackend(engine.url, model="medgemma"), [{"role": "user", "content": "hi"}], {})
        assert len(engine.bodies) == 1, "the SDK retried"
    message = str(caught.value)
    assert says in message and "\n" not in message and "/srv/x.py" not in message and "DOE" not in message
    assert isinstance(caught.value, MedGemmaEdgeError)


def test_error_event_and_unfinished_stream_mid_answer():
    failing = [{"choices": [{"index": 0, "delta": {"content": "No"}, "finish_reason": None}]},
               {"error": {"message": "slot failed\ntraceback…"}}]
    with FakeEngine("vllm", failing) as engine:
        with pytest.raises(UpstreamError, match="failed mid-answer: slot failed$"):
            answer(UpstreamBackend(engine.url), [{"role": "user", "content": "hi"}], {})
    cut = [{"choices": [{"index": 0, "delta": {"content": "No"}, "finish_reason": None}]}]
    with FakeEngine("vllm", cut) as engine:
        with pytest.raises(UpstreamError, match="without finishing"):
            answer(UpstreamBackend(engine.url), [{"role": "user", "content": "hi"}], {})


def test_unreachable_upstream_is_one_line_and_a_502():
    from medgemma_edge.server import ServerConfig, ServerThread, build_app

    backend = UpstreamBackend(f"http://127.0.0.1:{free_port()}/v1", model="m", kind="vllm")
    with pytest.raises(UpstreamError, match="cannot reach the upstream engine") as caught:
        answer(backend, [{"role": "user", "content": "hi"}], {})
    assert "\n" not in str(caught.value)
    with ServerThread(build_app(backend, ServerConfig())) as server:
        got = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                         json={"messages": [{"role": "user", "content": "hi"}]})
    assert got.status_code == 502 and "cannot reach the upstream engine" in one_line_error(got)


@pytest.mark.parametrize("status, payload, says", [
    (400, {"error": {"message": "the request exceeds the available context size", "type": "exceed_context_size_error"}},
     "the request exceeds the available context size"),
    (429, {"error": {"message": "all slots are busy"}}, "all slots are busy")])
def test_engine_refusal_of_the_request_reaches_the_client(status, payload, says):
    """The engine's 400 (llama-server's answer to a prompt beyond its context) is the client's to
    fix: a 400 with the engine's reason; its 429 a 429 with Retry-After."""
    from medgemma_edge.server import ServerConfig, ServerThread, build_app

    with FakeEngine("llamacpp", (status, payload)) as engine, \
            ServerThread(build_app(UpstreamBackend(engine.url), ServerConfig())) as server:
        got = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                         timeout=30)
    assert got.status_code == status and says in one_line_error(got)
    assert status != 429 or int(got.headers["retry-after"]) >= 1
