"""`serve --metrics`: GET /metrics in Prometheus' text format, read back with prometheus_client's own
parser. The counts are those of the requests made, by route template and status; the answer
histograms hold the backend's own Stats; no label or value carries what a request sent; /metrics is
404 without --metrics and needs the key when the server has one."""

import base64
import io
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from medgemma_edge.runtime.reply import Response, Stats
from medgemma_edge.server import ServerConfig, ServerThread, build_app
from medgemma_edge.server.backend import LocalBackend

MARKER = "Quixotic-marmalade-5531"  # a prompt's words, a study UID, a query: none may reach /metrics


def samples(text: str) -> dict[tuple, float]:
    """(sample name, sorted labels) → value, of every family in an exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def requests_counted(text: str) -> dict[tuple, float]:
    """(endpoint, method, status) → count, /metrics' own requests left out."""
    out = {}
    for (name, labels), value in samples(text).items():
        labels = dict(labels)
        if name == "medgemma_edge_http_requests_total" and labels["endpoint"] != "/metrics":
            out[labels["endpoint"], labels["method"], labels["status"]] = value
    return out


def value(text: str, name: str) -> float:
    return samples(text)[name, ()]


def answers(text: str) -> float:
    """Answers finished, whatever their finish reason."""
    return sum(v for (name, _), v in samples(text).items() if name == "medgemma_edge_answers_total")


def _png_url() -> str:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


class StatsBackend:
    """Answers "ok" with the given Stats; `gate` (an Event), when set up, holds every answer until set."""
    model_id, notice = "stats", None

    def __init__(self, stats: Stats, gate: threading.Event | None = None):
        self.stats, self.gate = stats, gate

    def chat(self, messages, options, cancelled):
        if self.gate is not None:
            assert self.gate.wait(30)
        yield Response("ok", 1, 3, 1)
        yield Response("", None, 3, 1, "stop", None, self.stats)

    def prepare(self, messages, options):
        pass


def wait_for(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "waited too long"
        time.sleep(0.02)


HI = {"max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}


def test_a_real_model_counts_what_was_asked_and_nothing_it_was_told(tiny_bundle_f32):
    import medgemma_edge

    backend = LocalBackend(medgemma_edge.load(tiny_bundle_f32, threads=2, context=2048))
    with ServerThread(build_app(backend, ServerConfig(metrics=True))) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        ask = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png_url()}},
                                            {"type": "text", "text": f"Describe {MARKER}."}]}]
        client.chat.completions.create(model="any", max_tokens=4, messages=ask)  # encodes the picture
        list(client.chat.completions.create(model="any", max_tokens=4, messages=ask, stream=True))  # cached
        with httpx.Client(base_url=server.url, timeout=60) as http:
            assert http.post("/v1/chat/completions", json={"messages": [], "note": MARKER}).status_code == 400
            assert http.get(f"/v1/studies/1.2.{MARKER}", params={"q": MARKER}).status_code == 404  # no node
            assert http.get(f"/{MARKER}/x").status_code == 404
            page = http.get("/metrics")
    print(page.text[:1500])
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    assert MARKER not in page.text
    assert requests_counted(page.text) == {("/v1/chat/completions", "POST", "200"): 2,
                                           ("/v1/chat/completions", "POST", "400"): 1,
                                           ("/v1/studies/{study_uid}", "GET", "404"): 1,
                                           ("other", "GET", "404"): 1}
    assert answers(page.text) == 2
    assert value(page.text, "medgemma_edge_time_to_first_token_seconds_count") == 2
    assert value(page.text, "medgemma_edge_prefill_tokens_per_second_count") == 2
    assert value(page.text, "medgemma_edge_images_total") == 2
    assert value(page.text, "medgemma_edge_image_cache_hits_total") == 1  # the second answer's picture
    assert value(page.text, "medgemma_edge_image_encode_seconds_count") == 1  # only the first encoded
    assert value(page.text, "medgemma_edge_prepared_restores_total") == 0
    assert value(page.text, "medgemma_edge_model_loaded") == 1
    assert value(page.text, "medgemma_edge_peak_rss_bytes") > 10 << 20


def test_stats_fill_the_histograms_and_gauges_follow_the_queue_and_the_load():
    stats = Stats(images=3, images_from_cache=2, image_encode_s=1.5, restored_tokens=300, prefill_tok_s=120.0,
                  ttft_s=0.2, decode_tok_s=None)  # a backend that did not measure decode speed
    gate, loaded = threading.Event(), threading.Event()

    def load():
        assert loaded.wait(30)
        return StatsBackend(stats, gate)

    with ServerThread(build_app(load, ServerConfig(metrics=True))) as server:
        url = server.url
        assert value(httpx.get(url + "/metrics").text, "medgemma_edge_model_loaded") == 0
        loaded.set()
        wait_for(lambda: httpx.get(url + "/health").json()["status"] != "loading")
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(
            httpx.post(url + "/v1/chat/completions", json=HI, timeout=30))) for _ in range(2)]
        for t in threads:  # one answer holds the model at the gate, the other waits behind it
            t.start()
        wait_for(lambda: httpx.get(url + "/health").json()["queue"] == 1)
        page = httpx.get(url + "/metrics").text
        assert value(page, "medgemma_edge_model_loaded") == 1 and value(page, "medgemma_edge_queue_length") == 1
        gate.set()
        for t in threads:
            t.join(30)
        page = httpx.get(url + "/metrics").text
    assert [a.status_code for a in answers] == [200, 200]
    assert value(page, "medgemma_edge_queue_length") == 0
    assert samples(page)["medgemma_edge_answers_total", (("finish_reason", "stop"),)] == 2
    assert value(page, "medgemma_edge_images_total") == 6 and value(page, "medgemma_edge_image_cache_hits_total") == 4
    assert value(page, "medgemma_edge_prepared_restores_total") == 2
    assert value(page, "medgemma_edge_image_encode_seconds_sum") == 3.0
    assert value(page, "medgemma_edge_prefill_tokens_per_second_sum") == 240.0
    assert samples(page)["medgemma_edge_time_to_first_token_seconds_bucket", (("le", "0.25"),)] == 2
    assert samples(page)["medgemma_edge_time_to_first_token_seconds_bucket", (("le", "0.1"),)] == 0
    assert value(page, "medgemma_edge_decode_tokens_per_second_count") == 0


def test_metrics_are_off_by_default():
    with ServerThread(build_app(StatsBackend(Stats()))) as server:
        r = httpx.get(server.url + "/metrics")
    assert r.status_code == 404 and "no such endpoint" in r.json()["error"]["message"]


def test_metrics_take_the_key_like_every_other_route_and_each_app_counts_apart():
    config = ServerConfig(api_key="s3cret", metrics=True)
    with ServerThread(build_app(StatsBackend(Stats()), config)) as keyed, \
            ServerThread(build_app(StatsBackend(Stats()), ServerConfig(metrics=True))) as other:
        assert httpx.get(keyed.url + "/metrics").status_code == 401
        assert httpx.get(keyed.url + "/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        httpx.post(keyed.url + "/v1/chat/completions", json=HI)  # refused before any route: counted
        page = httpx.get(keyed.url + "/metrics", headers={"Authorization": "Bearer s3cret"})
        assert page.status_code == 200 and "s3cret" not in page.text
        assert httpx.post(other.url + "/v1/chat/completions", json=HI).status_code == 200
        other_page = httpx.get(other.url + "/metrics").text
    counted = samples(page.text)
    assert counted["medgemma_edge_http_requests_total", (("endpoint", "/metrics"), ("method", "GET"),
                                                         ("status", "401"))] == 2
    assert requests_counted(page.text) == {("/v1/chat/completions", "POST", "401"): 1}
    assert requests_counted(other_page) == {("/v1/chat/completions", "POST", "200"): 1}


def test_a_method_nobody_sends_is_not_a_label():
    with ServerThread(build_app(StatsBackend(Stats()), ServerConfig(metrics=True))) as server:
        httpx.request(MARKER.upper()[:10], server.url + "/health")
        page = httpx.get(server.url + "/metrics").text
    assert requests_counted(page) == {("/health", "other", "405"): 1}


@pytest.mark.parametrize("flags,on", [([], False), (["--metrics"], True)])
def test_the_flag_reaches_the_config(monkeypatch, tiny_bundle_f32, flags, on):
    from medgemma_edge.cli import main
    from medgemma_edge.server import runner

    seen = []
    monkeypatch.setattr(runner, "serve", lambda backend, config, node=None: seen.append(config))
    with pytest.raises(SystemExit):
        main.main(["serve", "-m", str(tiny_bundle_f32), *flags], prog_name="medgemma-edge")
    assert seen[0].metrics is on
