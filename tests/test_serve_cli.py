"""`medgemma-edge serve` itself: the port opens before the model loads (/health "loading", chat
503 with Retry-After), a bad bundle or a taken port is one line and exit 2 before the port opens,
and a model that fails to load after the port opened stops the server with that line."""

import socket
import threading
import time

import httpx
import pytest
import uvicorn

import medgemma_edge
from medgemma_edge import BundleError
from medgemma_edge.cli import main
from medgemma_edge.server import runner

WAIT_S = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """`serve ARGS` run in a thread as the console script runs it; `.code` is its exit status."""

    def __init__(self, monkeypatch, args):
        self.servers, self.code = [], None
        servers = self.servers

        class Recorded(uvicorn.Server):  # kept, so the test can stop it as Ctrl-C would
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                servers.append(self)

        monkeypatch.setattr(runner.uvicorn, "Server", Recorded)
        monkeypatch.setattr(runner, "logging_config", lambda: None)  # pytest's logging stays as it is
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self._run, args=(["serve", "--port", str(self.port), *args],),
                                       daemon=True)
        self.thread.start()

    def _run(self, args):
        try:
            main.main(args, prog_name="medgemma-edge")
        except SystemExit as exit_:
            self.code = exit_.code

    def health(self) -> dict:
        """/health once the port answers."""
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                return httpx.get(self.url + "/health").json()
            except httpx.TransportError:
                assert self.thread.is_alive() and time.monotonic() < deadline, "the port never opened"
                time.sleep(0.05)

    def stop(self) -> None:
        for server in self.servers:
            server.should_exit = True
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive()


@pytest.fixture
def gate(monkeypatch):
    """medgemma_edge.load waits for `gate.set()` (then loads, or raises `gate.error`)."""
    gate = threading.Event()
    gate.error, gate.calls = None, 0
    real = medgemma_edge.load

    def held_load(*args, **kwargs):
        gate.calls += 1
        assert gate.wait(WAIT_S)
        if gate.error is not None:
            raise gate.error
        return real(*args, **kwargs)

    monkeypatch.setattr(medgemma_edge, "load", held_load)
    return gate


def test_the_port_answers_loading_before_the_model_is_ready(tiny_bundle_f32, monkeypatch, gate):
    served = Served(monkeypatch, ["-m", str(tiny_bundle_f32), "--threads", "2", "--context", "2048"])
    try:
        assert served.health()["status"] == "loading"
        r = httpx.post(served.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"], r.text
        assert int(r.headers["retry-after"]) >= 1
        gate.set()
        deadline = time.monotonic() + WAIT_S
        while (status := served.health()["status"]) != "ready":
            assert status == "loading" and time.monotonic() < deadline, status
            time.sleep(0.05)
        r = httpx.post(served.url + "/v1/chat/completions", json={
            "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}, timeout=120)
        assert r.status_code == 200, r.text
    finally:
        gate.set()
        served.stop()
    assert served.code in (None, 0)


def test_a_model_that_fails_to_load_stops_the_server_with_its_line(tiny_bundle_f32, monkeypatch, gate, capsys):
    served = Served(monkeypatch, ["-m", str(tiny_bundle_f32)])
    assert served.health()["status"] == "loading"
    gate.error = BundleError("bundle file x.gguf does not match its sha256 — copy it again")
    gate.set()
    served.thread.join(WAIT_S)
    err = capsys.readouterr().err
    print(err)
    assert served.code == 2 and "error: bundle file x.gguf does not match" in err
    with pytest.raises(httpx.TransportError):
        httpx.get(served.url + "/health")


@pytest.mark.parametrize("damage", ["no manifest", "bad json", "missing file"])
def test_a_bad_bundle_is_one_line_before_the_port_opens(tiny_bundle_f32, tmp_path, monkeypatch, gate, capsys, damage):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    if damage != "no manifest":
        manifest = (tiny_bundle_f32 / "manifest.json").read_text()
        (bundle / "manifest.json").write_text("{" if damage == "bad json" else manifest)
    opened = []
    monkeypatch.setattr(runner, "listening_socket", lambda *a: opened.append(a))
    with pytest.raises(SystemExit) as exit_:
        main.main(["serve", "-m", str(bundle)], prog_name="medgemma-edge")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    print(lines)
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert opened == [] and gate.calls == 0


def test_a_taken_port_is_one_line(tiny_bundle_f32, gate, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(SystemExit) as exit_:
            main.main(["serve", "-m", str(tiny_bundle_f32), "--port", str(taken.getsockname()[1])],
                      prog_name="medgemma-edge")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert exit_.value.code == 2 and len(lines) == 1 and "--port" in lines[0], lines
    assert gate.calls == 0


def test_allow_host_reaches_the_config(monkeypatch, tiny_bundle_f32):
    seen = []
    monkeypatch.setattr(runner, "serve", lambda backend, config, node=None: seen.append(config))
    with pytest.raises(SystemExit):
        main.main(["serve", "-m", str(tiny_bundle_f32), "--allow-host", "kiosk.local", "--allow-host", "pc2"],
                  prog_name="medgemma-edge")
    assert seen[0].allowed_hosts == ("kiosk.local", "pc2")
