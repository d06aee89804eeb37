"""`serve --upstream`: our image path in front of another OpenAI-compatible engine.

The engine here is llama-cpp-python's own OpenAI server (`python -m llama_cpp.server`, chat format
mtmd, an API key) holding the tiny bundle's two GGUF files, in a subprocess on a free loopback port, stopped by
its pid. The backend must hand it exactly our 896² view of a DICOM file; what the engine then does
with the text (its chat template, its sampler) is its own, and the parity test below accounts for
it token by token. Structured answers, a tool's history and the engine's refusals go through it for
real.

vLLM and Ollama cannot run here: what they are sent is tested against `FakeEngine` in
tests/test_upstream_requests.py.
"""

from __future__ import annotations

import base64
import difflib
import json
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from medgemma_edge.runtime import chat as chatfmt
from medgemma_edge.runtime.preprocess import model_view
from medgemma_edge.runtime.sources import load_pictures
from medgemma_edge.server.upstream import UpstreamBackend
from tests.upstream_helpers import (ENGINE_KEY, KEYED, LAB_TOOL, NO_PENALTY, QUESTION, SCHEMA, THREADS, TOKENS,
                                    ask, ct_small, decoded, free_port, image_urls, one_line_error)

READY_S = 180.0  # the engine's start (imports, model load) on a slow machine


# -- llama-cpp-python's server as the upstream -----------------------------------------------------
@pytest.fixture(scope="module")
def upstream(tiny_bundle_f32, tmp_path_factory):
    import importlib.util

    missing = [m for m in ("fastapi", "sse_starlette", "starlette_context", "pydantic_settings", "uvicorn")
               if importlib.util.find_spec(m) is None]
    assert not missing, f"llama_cpp.server needs {missing}: install the dev extra (make test does)"
    files = {f["role"]: f["path"] for f in json.loads((tiny_bundle_f32 / "manifest.json").read_text())["files"]}
    port = free_port()
    log = tmp_path_factory.mktemp("upstream") / "llama_cpp_server.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(tiny_bundle_f32 / files["text"]),
           "--clip_model_path", str(tiny_bundle_f32 / files["vision"]), "--chat_format", "mtmd",
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
           "--n_threads", str(THREADS), "--n_threads_batch", str(THREADS), "--api_key", ENGINE_KEY]
    with open(log, "wb") as out:
        engine = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + READY_S
        while True:
            assert engine.poll() is None, f"llama_cpp.server exited:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(url + "/models", headers=KEYED, timeout=2).status_code == 200:
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
    backend = UpstreamBackend(upstream, ENGINE_KEY, threads=THREADS, extra_body=NO_PENALTY)
    options = {"max_tokens": TOKENS, "temperature": 0.0}
    out = list(backend.chat(ask(dcm), options, lambda: False))
    answer_text, last = "".join(r.text for r in out), out[-1]

    # 1. The engine receives exactly our view: model_view of the DICOM, byte for byte (the body
    # is what goes on the wire, as the FakeEngine tests check).
    sent = backend.request_body(ask(dcm), options)
    assert backend.engine_kind() == "llama.cpp"  # llama-cpp-python's server says owned_by "me"
    (url,) = image_urls(sent["messages"][0])
    want = model_view(load_pictures(dcm), 896, "pad", threads=THREADS)[0]
    got = decoded(url)
    assert got.shape == want.shape == (896, 896, 3)
    assert np.array_equal(got, want), f"{np.count_nonzero(got != want)} of {want.size} bytes differ"

    # 2. Token accounting: our prompt and the engine's differ by its image-block layout only.
    joined = httpx.post(upstream + "/chat/completions", json=sent, headers=KEYED, timeout=120).json()
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
    print(f"answers: ours {reply.text!r}\n         upstream {answer_text!r} (joined: "
          f"{joined['choices'][0]['message']['content']!r})")
    assert reply.prompt_tokens == len(ours)
    assert theirs_n == len(theirs), "the engine's prompt is not our prompt with its image layout"
    assert changes and all("".join(a + b).strip() == "" for _, a, b in changes), "more than blank lines differ"

    # 3. The answers. Same model, same view, a prompt one blank-line token apart: with this tiny
    # random model the greedy answers agree; a real model may part ways after a few tokens.
    assert answer_text.strip() and answer_text == joined["choices"][0]["message"]["content"]
    assert answer_text == reply.text, f"the engine answered {answer_text!r}, our runtime {reply.text!r}"
    text_only = local.chat([{"role": "user", "content": QUESTION}], max_new_tokens=TOKENS).text
    assert text_only != reply.text, "the answer does not depend on the image: the comparison would prove nothing"

    # 4. What the last response says: the engine's counts where it sends them.
    assert (last.finish_reason, last.completion_tokens) == ("length", TOKENS)
    assert last.stats.images == 1 and last.stats.preprocess_ms > 0 and last.stats.ttft_s > 0
    assert last.prompt_tokens in (0, theirs_n)  # llama-cpp-python's stream carries no usage: 0


def test_cancel_stops_while_the_engine_is_still_silent(upstream):
    """A client that leaves during the engine's prefill frees our worker at once, and the engine
    answers the next request."""
    backend = UpstreamBackend(upstream, ENGINE_KEY, threads=THREADS, extra_body=NO_PENALTY)
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


@pytest.fixture(scope="module")
def servers(upstream, local):
    """Our server in front of the engine, and our server with the same bundle loaded locally."""
    from medgemma_edge.server import ServerConfig, ServerThread, build_app
    from medgemma_edge.server.backend import LocalBackend

    backend = UpstreamBackend(upstream, ENGINE_KEY, threads=THREADS, extra_body=NO_PENALTY)
    with ServerThread(build_app(backend, ServerConfig())) as front, \
            ServerThread(build_app(LocalBackend(local), ServerConfig())) as alone:
        yield backend, front.url, alone.url
    backend.close()


def test_our_server_in_front_of_the_engine(servers):
    """The whole route: the openai client → our server (UpstreamBackend) → the engine, with a
    DICOM data URL; the answer is the one the backend gives when called directly."""
    import openai
    backend, front, _ = servers
    deadline = time.monotonic() + 10
    while backend.model_id == "upstream" and time.monotonic() < deadline:  # the name is learnt in the background
        time.sleep(0.05)
    listed = httpx.get(backend.base_url + "/models", headers=KEYED, timeout=10).json()
    assert backend.model_id == listed["data"][0]["id"]
    direct = "".join(r.text for r in backend.chat(ask(ct_small()), {"max_tokens": TOKENS}, lambda: False))
    dicom_url = "data:application/dicom;base64," + base64.b64encode(ct_small()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": dicom_url}},
                                             {"type": "text", "text": QUESTION}]}]
    client = openai.OpenAI(base_url=front + "/v1", api_key="unused", max_retries=0, timeout=120)
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


def test_structured_answer_held_by_the_engine(servers, upstream):
    """response_format json_schema through our server: llama-cpp-python's server gets the schema in
    the one form it takes, and its answer is valid for the schema. (Its refusal of OpenAI's own
    json_schema form, as a 500, is checked too: it is why the llama.cpp kind sends json_object +
    schema.)"""
    import jsonschema
    _, front, _ = servers
    request = {"messages": [{"role": "user", "content": "Is this urgent? Answer in JSON."}], "max_tokens": 64,
               "response_format": {"type": "json_schema", "json_schema": {"name": "triage", "schema": SCHEMA}}}
    got = httpx.post(front + "/v1/chat/completions", json=request, timeout=120).json()
    text, finish = got["choices"][0]["message"]["content"], got["choices"][0]["finish_reason"]
    free = httpx.post(front + "/v1/chat/completions", json={**request, "response_format": None}, timeout=120).json()
    print(f"\nheld: {text!r} ({finish}); free: {free['choices'][0]['message']['content']!r}")
    assert finish == "stop", "no room to finish: the check below would prove nothing"
    jsonschema.validate(json.loads(text), SCHEMA)
    with pytest.raises((ValueError, jsonschema.ValidationError)):  # unheld, this model writes no such JSON
        jsonschema.validate(json.loads(free["choices"][0]["message"]["content"]), SCHEMA)
    refused = httpx.post(upstream + "/chat/completions", headers=KEYED, timeout=60, json={
        "messages": request["messages"], "max_tokens": 4, "response_format": request["response_format"]})
    assert refused.status_code == 500 and "Input should be 'text' or 'json_object'" in refused.text, refused.text[:300]


def test_engine_failures_are_a_502_in_one_line(upstream):
    """Real failures of the engine: our key refused (401), and a prompt beyond its context, on which
    llama-cpp-python's stream stops after its 200 without a word — each a 502 in one line."""
    from medgemma_edge.server import ServerConfig, ServerThread, build_app

    wrong_key = UpstreamBackend(upstream, "not-the-key", model="m", kind="llama.cpp")
    long_prompt = {"messages": [{"role": "user", "content": "scan " * 3000}], "max_tokens": 4}
    with ServerThread(build_app(wrong_key, ServerConfig())) as server:
        refused = httpx.post(server.url + "/v1/chat/completions", json=long_prompt, timeout=120)
    with ServerThread(build_app(UpstreamBackend(upstream, ENGINE_KEY), ServerConfig())) as server:
        too_long = httpx.post(server.url + "/v1/chat/completions", json=long_prompt, timeout=120)
    print(f"\n{refused.status_code}: {one_line_error(refused)}\n{too_long.status_code}: {one_line_error(too_long)}")
    assert refused.status_code == 502 and "refused our key (401)" in one_line_error(refused)
    assert too_long.status_code == 502 and "ended the answer without finishing" in one_line_error(too_long)



def test_tool_history_round_trip(servers):
    """A call, then a second turn with the tool's result (tool_choice auto: llama.cpp's `grammar`).
    What our backend sends for the second turn, the engine answers as the local model does, from
    a prompt of as many tokens: the history reached it as the same prompt. (Compared on the
    engine's joined answer: its stream drops the bytes of a token that ends inside a UTF-8
    character, which this random model writes.) A different result changes the answer, so the
    equality can fail."""
    from medgemma_edge.server.translate import chat_request

    backend, front, alone = servers
    # An empty system turn: the prompt holds the tool list alone, not the server's default system
    # prompt before it (with that, this random model's second answer happens not to depend on the result).
    first = [{"role": "system", "content": ""},
             {"role": "user", "content": "Chest pain since this morning. Check the troponin."}]
    call = {"messages": first, "tools": [LAB_TOOL], "max_tokens": 48,
            "tool_choice": {"type": "function", "function": {"name": "lookup_lab"}}}
    turn1 = {url: httpx.post(url + "/v1/chat/completions", json=call, timeout=120).json() for url in (front, alone)}
    choice = turn1[front]["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    (tool_call,) = choice["message"]["tool_calls"]
    assert json.loads(tool_call["function"]["arguments"])["test"] in ("troponin", "d-dimer")
    assert tool_call["function"] == turn1[alone]["choices"][0]["message"]["tool_calls"][0]["function"]
    tool_call = {**tool_call, "id": "call_1"}  # ids are random and in the prompt: one id, one prompt each run

    def second(result: str) -> dict:
        history = [*first, {"role": "assistant", "content": None, "tool_calls": [tool_call]},
                   {"role": "tool", "tool_call_id": tool_call["id"], "content": result}]
        return {"messages": history, "tools": [LAB_TOOL], "max_tokens": TOKENS}

    said = lambda message: (message.get("content"), [c["function"] for c in message.get("tool_calls") or []])
    seen = {}
    for result in ('{"troponin": "2.1 ng/mL", "flag": "high"}', "troponin 0.01 ng/mL: normal"):
        request = second(result)
        ours = httpx.post(alone + "/v1/chat/completions", json=request, timeout=120).json()
        through = httpx.post(front + "/v1/chat/completions", json=request, timeout=120)
        chat = chat_request(request, None, max_images=8, max_tokens=TOKENS)
        sent = backend.request_body(chat.messages, chat.options)
        assert "grammar" in sent and sent["messages"][-1]["content"].startswith("Tool result of lookup_lab")
        theirs = httpx.post(backend.base_url + "/chat/completions", json=sent, headers=KEYED, timeout=120).json()
        seen[result] = said(ours["choices"][0]["message"])
        print(f"\nsecond turn: ours {seen[result]} ({ours['usage']['prompt_tokens']} prompt tokens), engine "
              f"{theirs['choices'][0]['message']['content']!r} ({theirs['usage']['prompt_tokens']}), through our "
              f"server {through.json()['choices'][0]['message']!r}")
        assert through.status_code == 200 and through.json()["choices"][0]["finish_reason"] in ("stop", "length")
        assert theirs["usage"]["prompt_tokens"] == ours["usage"]["prompt_tokens"]
        assert (theirs["choices"][0]["message"]["content"], []) == seen[result]
    assert len(set(map(repr, seen.values()))) == 2, "the answer ignores the tool's result"
