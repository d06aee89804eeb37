"""Hostile requests against a real server (uvicorn on a free loopback port, the tiny f32 bundle):
DNS rebinding, framing, a deeply nested body, and prompts far larger than any context. Each gets
its status in OpenAI's error shape; the oversized prompt is refused before anything tokenizes it."""

import base64
import io
import json
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from medgemma_edge.server import ServerConfig, ServerThread, build_app
from medgemma_edge.server.backend import LocalBackend
from medgemma_edge.server.http import MAX_JSON_DEPTH

CONTEXT = 2048  # a fixed context: the character bound is CONTEXT × the vocabulary's longest piece
BIG_PROMPT_MB = 64
REFUSED_WITHIN_S = 10.0  # reading and parsing 64 MB on loopback, on a busy machine; tokenizing it is far slower


@pytest.fixture(scope="module")
def backend(tiny_bundle_f32):
    import medgemma_edge

    return LocalBackend(medgemma_edge.load(tiny_bundle_f32, threads=2, context=CONTEXT))


@pytest.fixture
def tokenized(backend, monkeypatch):
    """Lengths of the texts the model's tokenizer was given during the test (it still runs)."""
    engine, seen = backend.model.engine, []
    real = engine.tokenize
    monkeypatch.setattr(engine, "tokenize", lambda text, **kw: seen.append(len(text)) or real(text, **kw))
    return seen


@pytest.fixture(scope="module")
def server(backend):
    with ServerThread(build_app(backend, ServerConfig(max_body_mb=BIG_PROMPT_MB + 8,
                                                      allowed_hosts=("kiosk.clinic.local",)))) as running:
        yield running


def _ask(text="Hi", *images):
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    return {"max_tokens": 2, "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]}


def _openai_error(r, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    error = r.json()["error"]
    print(f"{status}: {error['message']}")
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert "Traceback" not in r.text
    return error


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "127.0.0.1.evil.example", "localhost.evil"])
def test_a_keyless_server_refuses_other_host_names(server, host):
    r = httpx.post(server.url + "/v1/chat/completions", json=_ask(), headers={"Host": host})
    assert "--allow-host" in _openai_error(r, 421)["message"]
    assert httpx.get(server.url + "/", headers={"Host": host}).status_code == 421  # the page too


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:1234", "127.0.0.1", "[::1]:8080", "kiosk.clinic.local:80"])
def test_loopback_names_and_allowed_hosts_are_answered(server, host):
    assert httpx.get(server.url + "/v1/models", headers={"Host": host}).status_code == 200


def test_with_a_key_any_host_name_reaches_the_key_check(backend):
    with ServerThread(build_app(backend, ServerConfig(api_key="k3y"))) as running:
        url, host = running.url + "/v1/models", {"Host": "kiosk.example"}
        assert httpx.get(url, headers=host).status_code == 401
        assert httpx.get(url, headers={**host, "Authorization": "Bearer k3y"}).status_code == 200


def test_allow_host_names_are_checked():
    from medgemma_edge import InputError

    for bad in ("evil.example:80", "http://x", "Kiosk", ""):
        with pytest.raises(InputError, match="--allow-host"):
            ServerConfig(allowed_hosts=(bad,)).check()


def test_the_kiosk_page_has_a_policy_and_cannot_be_framed(server):
    for path in ("/", "/kiosk/kiosk.js", "/kiosk/kiosk.css"):
        r = httpx.get(server.url + path)
        csp = dict(d.strip().split(" ", 1) for d in r.headers["content-security-policy"].split(";"))
        assert r.status_code == 200 and r.headers["x-frame-options"] == "DENY", path
        assert csp["frame-ancestors"] == "'none'" and csp["default-src"] == "'none'", csp
        assert csp["script-src"] == "'self'" and csp["connect-src"] == "'self'", csp


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/images"])
@pytest.mark.parametrize("depth", [100_000, MAX_JSON_DEPTH + 1])
def test_deeply_nested_json_is_a_400(server, path, depth):
    body = "[" * depth + "]" * depth  # past Python's recursion limit, and past ours under it
    r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"})
    assert "nests deeper" in _openai_error(r, 400)["message"]


def test_nesting_a_request_needs_is_not_refused(server):
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    for _ in range(8):  # a tool schema nested a few levels: an ordinary request
        schema = {"type": "object", "properties": {"inner": schema}}
    body = {**_ask(), "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    assert httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).status_code == 200


def test_a_64_mb_text_prompt_is_refused_before_tokenizing(server, tokenized):
    body = json.dumps(_ask("lung " * ((BIG_PROMPT_MB << 20) // 5 - 40))).encode()  # just under 64 MiB
    t0 = time.perf_counter()
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"},
                   timeout=120)
    elapsed = time.perf_counter() - t0
    print(f"{len(body) / 2**20:.0f} MB of text refused in {elapsed:.2f} s; tokenizer calls: {tokenized}")
    assert "text" in _openai_error(r, 413)["message"]
    assert tokenized == [] and elapsed < REFUSED_WITHIN_S


def test_text_longer_than_the_context_can_hold_is_refused_before_tokenizing(server, backend, tokenized):
    bound = backend.max_prompt_chars
    assert bound == CONTEXT * max(len(backend.model.engine.piece(t, special=True))
                                  for t in range(backend.model.engine.n_vocab))
    r = httpx.post(server.url + "/v1/chat/completions", json=_ask("x" * (bound + 1)), timeout=120)
    assert "cannot fit" in _openai_error(r, 400)["message"] and tokenized == []
    # At the bound the text may still fit as far as the server can tell: the model decides (and refuses).
    # The server adds the default system prompt (runtime.presets.card_system) to a chat without one.
    from medgemma_edge.runtime.presets import card_system

    question = "lung " * ((bound - len(card_system(False))) // 5)
    r = httpx.post(server.url + "/v1/chat/completions", json=_ask(question), timeout=120)
    assert "context" in _openai_error(r, 400)["message"] and tokenized, "the model never saw the prompt"


def test_the_bound_is_sound_for_the_longest_pieces(backend):
    """Text made of the piece that spells the most characters, repeated: never more characters
    per token than the bound assumes (the longest piece in bytes)."""
    engine = backend.model.engine
    pieces = [engine.piece(t, special=True) for t in range(engine.n_vocab)]
    most_chars = max(pieces, key=lambda p: len(p.decode("utf-8", "replace")))
    text = most_chars.decode("utf-8") * 50
    per_token = len(text) / len(engine.tokenize(text))
    print(f"{most_chars!r}: {per_token:.1f} characters a token; the bound assumes {max(map(len, pieces))}")
    assert per_token <= max(map(len, pieces))


def test_images_keep_the_body_allowance_text_does_not(backend):
    """With a text allowance smaller than one image, a request with that image is still answered."""
    pixels = np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()
    text_mb = 0.5 * len(url) / 2**20
    with ServerThread(build_app(backend, ServerConfig(max_text_mb=text_mb))) as running:
        endpoint = running.url + "/v1/chat/completions"
        assert httpx.post(endpoint, json=_ask("Describe.", url), timeout=120).status_code == 200
        r = httpx.post(endpoint, json=_ask("x" * len(url)), timeout=120)
        assert "text" in _openai_error(r, 413)["message"]
