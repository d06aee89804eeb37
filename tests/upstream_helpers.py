"""What the upstream tests share: the questions, the schema and tool they ask with, and
`FakeEngine`, a stand-in for vLLM's and Ollama's OpenAI endpoints — a loopback HTTP server that
lists one model with the `owned_by` each engine sends, records every request body as it arrives
on the wire, and answers with a scripted stream or status. It fakes their request format, not our
code, and also serves the error shapes and stream events no real engine sends on demand.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
from PIL import Image

THREADS = 2  # the same for the engine and our model, so both sum in the same order
QUESTION = "Describe this CT slice."
TOKENS = 16
NO_PENALTY = {"repeat_penalty": 1.0}  # llama-cpp-python's default 1.1 would bend a greedy answer
ENGINE_KEY = "engine-key"  # the engine wants one: every test below that reaches it sends it
KEYED = {"Authorization": f"Bearer {ENGINE_KEY}"}
SCHEMA = {"type": "object", "properties": {"finding": {"enum": ["normal", "abnormal"]}, "urgent": {"type": "boolean"}},
          "required": ["finding", "urgent"], "additionalProperties": False}
LAB_TOOL = {"type": "function", "function": {
    "name": "lookup_lab", "description": "The patient's latest lab value by test name.",
    "parameters": {"type": "object", "properties": {"test": {"enum": ["troponin", "d-dimer"]}},
                   "required": ["test"], "additionalProperties": False}}}


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


def free_port() -> int:
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line_error(response: httpx.Response) -> str:
    message = response.json()["error"]["message"]
    assert "\n" not in message and len(message) < 600, message
    return message


# -- a stand-in for vLLM's and Ollama's OpenAI endpoints ---------------------------------------------
def chunks(*pieces: str, finish: str = "stop", usage: dict | None = None) -> list[dict]:
    out = [{"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
    out.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    return out + ([{"choices": [], "usage": usage}] if usage else [])


class FakeEngine:
    """`reply`: a list of stream chunks (sent as server-sent events, each flushed), or (status, JSON
    body) for a refusal. `bodies` and `headers` record each chat request as it arrived."""

    def __init__(self, owned_by: str = "vllm", reply=None, model: str = "medgemma"):
        self.owned_by, self.model, self.reply = owned_by, model, reply or chunks("fine")
        self.bodies, self.headers = [], []
        engine = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path.endswith("/models"):
                    self._json(200, {"object": "list", "data": [
                        {"id": engine.model, "object": "model", "owned_by": engine.owned_by}]})
                else:
                    self._json(404, {"error": "not found"})

            def do_POST(self):
                engine.bodies.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
                engine.headers.append({k.lower(): v for k, v in self.headers.items()})
                if isinstance(engine.reply, tuple):
                    return self._json(*engine.reply)
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.end_headers()
                for chunk in engine.reply:
                    self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                    self.wfile.flush()
                self.wfile.write(b": ping\n\ndata: [DONE]\n\n")

            def _json(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}/v1"

    def __enter__(self) -> FakeEngine:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()


def answer(backend, messages, options) -> list:
    return list(backend.chat(messages, options, lambda: False))
