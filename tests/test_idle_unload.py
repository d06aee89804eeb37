"""Idle unload (runtime/residency.py, server/idle.py, `serve --idle-unload MINUTES`): the model gives
its memory back when idle, the next call opens it again and answers as before; /health says
"unloaded", then "loading" while a request waits for it, then "ready"; background work keeps it
loaded. The last test runs the real `medgemma-edge serve` as a process and reads its resident
memory from /proc: it must drop by most of the weights after the idle time, and the next request
must answer (numbers printed)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from medgemma_edge.runtime.errors import BusyError

THREADS, CONTEXT, TOKENS = 2, 1024, 4
IDLE_MIN = 0.02  # 1.2 s: tests wait for it
ASK = [{"role": "user", "content": "Name one bone of the hand."}]


@pytest.fixture(scope="module")
def model(tiny_bundle_f32):
    import medgemma_edge

    return medgemma_edge.load(tiny_bundle_f32, threads=THREADS, context=CONTEXT)


def test_unload_frees_the_engine_and_the_next_answer_opens_it_again(model):
    before = model.chat(ASK, max_new_tokens=TOKENS)
    assert model.unload() and not model.loaded and model.engine is None and model._vision is None
    assert model.unload(), "unloading an unloaded model is nothing to do"
    again = model.chat(ASK, max_new_tokens=TOKENS)
    assert model.loaded and again.text == before.text  # greedy: the same answer from the same files

    stream = model.stream(ASK, max_new_tokens=TOKENS)
    next(stream)  # this thread holds the model now
    with pytest.raises(BusyError):
        model.unload()
    other = []
    waiter = threading.Thread(target=lambda: other.append(model.unload(wait=False)))
    waiter.start()
    waiter.join(10)
    assert other == [False] and model.loaded, "never unloaded under a caller"
    stream.close()


def test_idle_unload_is_refused_where_it_cannot_mean_anything():
    from click.testing import CliRunner

    from medgemma_edge.cli import main
    from medgemma_edge.runtime.errors import InputError
    from medgemma_edge.server import ServerConfig

    for bad in (0, -1, "5", True):
        with pytest.raises(InputError, match="idle_unload_min"):
            ServerConfig(idle_unload_min=bad).check()
    out = CliRunner().invoke(main, ["serve", "--upstream", "http://127.0.0.1:9", "--idle-unload", "5"])
    print(out.output)
    assert out.exit_code == 2 and "--upstream engine manages its own" in out.output
    assert len(out.output.strip().splitlines()) == 1


def _server(model, **config):
    from medgemma_edge.server import ServerConfig, ServerThread, build_app
    from medgemma_edge.server.backend import LocalBackend

    return ServerThread(build_app(LocalBackend(model), ServerConfig(idle_unload_min=IDLE_MIN, **config)))


def _wait_status(http, wanted: str, timeout: float = 30.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if http.get("/health").json()["status"] == wanted:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"/health never said {wanted!r} in {timeout:g} s: {http.get('/health').json()}")


def test_the_server_unloads_when_idle_and_a_request_waits_for_the_reload(model, monkeypatch):
    body = {"messages": ASK, "max_tokens": TOKENS}
    with _server(model) as server, httpx.Client(base_url=server.url, timeout=120) as http:
        first = http.post("/v1/chat/completions", json=body)
        assert first.status_code == 200, first.text
        waited = _wait_status(http, "unloaded")
        print(f"unloaded {waited:.1f} s after the answer (idle time {IDLE_MIN * 60:g} s)")
        assert waited >= IDLE_MIN * 60 * 0.5 and not model.loaded

        opened = model._open_text
        monkeypatch.setattr(model, "_open_text", lambda: (time.sleep(1.0), opened())[1])  # a slow load, seen
        answers = []
        asking = threading.Thread(target=lambda: answers.append(http.post("/v1/chat/completions", json=body)))
        asking.start()
        _wait_status(http, "loading", timeout=10)
        asking.join(120)
        assert answers[0].status_code == 200, answers[0].text
        assert answers[0].json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
        assert http.get("/health").json()["status"] in ("ready", "busy") and model.loaded


def test_background_work_keeps_the_model_loaded(model):
    steps_s, steps = 0.4, 6  # 2.4 s of background work, twice the idle time

    def make_steps(should_pause):
        for _ in range(steps):
            time.sleep(steps_s)
            yield None

    done = threading.Event()
    with _server(model) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        model.chat(ASK, max_new_tokens=1)  # loaded, whatever an earlier test left
        server.app.state.medgemma.worker.submit_steps(make_steps, on_done=lambda err: done.set())
        seen = set()
        while not done.is_set():
            seen.add(http.get("/health").json()["status"])
            time.sleep(0.05)
        print("statuses while the background task ran:", seen)
        assert "unloaded" not in seen and model.loaded
        _wait_status(http, "unloaded")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_serve_gives_the_memory_back_after_the_idle_time_and_answers_again(tmp_path):
    from medgemma_edge.demo import demo_bundle
    from medgemma_edge.testing.pacs import free_port
    from medgemma_edge.testing.serve import ServeProcess

    bundle = demo_bundle(progress=lambda *_: None)  # Gemma 3 270M, Q8_0: a 290 MB text GGUF
    weights_mb = max(p.stat().st_size for p in bundle.glob("*.gguf")) / 2**20
    port = free_port()
    args = ["-m", bundle, "--port", port, "--threads", THREADS, "--idle-unload", IDLE_MIN * 2.5]  # 3 s
    body = {"messages": ASK, "max_tokens": TOKENS}
    with ServeProcess(args, tmp_path / "serve.log", port, ready_s=300) as served, \
            httpx.Client(base_url=served.url, timeout=120) as http:
        first = http.post("/v1/chat/completions", json=body)
        assert first.status_code == 200, first.text
        loaded = _rss_mb(served.proc.pid)
        waited = _wait_status(http, "unloaded", timeout=60)
        unloaded = _rss_mb(served.proc.pid)
        t0 = time.monotonic()
        again = http.post("/v1/chat/completions", json=body)
        answer_s = time.monotonic() - t0
        assert again.status_code == 200, again.text
        reloaded = _rss_mb(served.proc.pid)
        health = http.get("/health").json()["status"]
    log = (tmp_path / "serve.log").read_text()
    print(f"weights {weights_mb:.0f} MB; RSS loaded {loaded:.0f} MB → unloaded {unloaded:.0f} MB "
          f"({waited:.1f} s after the answer) → reloaded {reloaded:.0f} MB; the answer after the unload took "
          f"{answer_s:.2f} s; /health {health}")
    assert loaded - unloaded > 0.8 * weights_mb, "the weights' memory was not given back"
    assert again.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    assert health in ("ready", "busy") and reloaded - unloaded > 0.5 * weights_mb
    assert "unloaded the model after" in log, log[-2000:]
