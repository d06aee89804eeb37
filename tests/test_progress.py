"""Progress before the first token (runtime/progress.py): `Model.stream(progress=True)` says how the
image encodes and the prompt evaluation go; the server streams it as chunks with an empty delta
and `medgemma_edge.progress`, which the real `openai` client parses and keeps in `model_extra`;
`ask` shows it on stderr: tqdm bars on a terminal (a real pseudo-terminal here), plain lines in a
log. The tiny f32 bundle answers (greedy: an answer with progress equals one without)."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import threading

import numpy as np
import openai
import pytest
from PIL import Image

from medgemma_edge.runtime.progress import Meter, Progress
from medgemma_edge.runtime.reply import Response

THREADS, CONTEXT, TOKENS, IMAGES = 2, 2048, 4, 3
FIELDS = {"stage", "done", "total", "elapsed_s", "eta_s"}


def _png(seed: int, size=(96, 80)) -> bytes:
    out = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _messages(seeds, text="Compare these pictures."):
    return [{"role": "user", "content": [*({"type": "image", "image": _png(s)} for s in seeds),
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def model(tiny_bundle_f32):
    import medgemma_edge

    return medgemma_edge.load(tiny_bundle_f32, threads=THREADS, context=CONTEXT)


def _split(items):
    """(Progress items, Responses), checking that every Progress comes before the first Response."""
    kinds = ["p" if isinstance(i, Progress) else "r" for i in items]
    assert "p" not in "".join(kinds).lstrip("p"), f"progress after the first token: {''.join(kinds)}"
    return [i for i in items if isinstance(i, Progress)], [i for i in items if isinstance(i, Response)]


def test_the_time_left_is_the_rate_so_far_or_the_remembered_one(monkeypatch):
    from types import SimpleNamespace

    from medgemma_edge.runtime import progress

    clock = iter([100.0, 100.0, 104.0, 106.0, 107.0])
    monkeypatch.setattr(progress, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    meter = Meter("images", 5, per_item_s=3.0)
    assert meter.at(0) == Progress("images", 0, 5, 0.0, 15.0)  # before any: 5 × the remembered 3 s
    assert meter.at(2) == Progress("images", 2, 5, 4.0, 6.0)  # 2 s each so far: 3 more take 6 s
    assert Meter("prompt", 10).at(0).eta_s is None  # nothing remembered, nothing measured yet


def test_a_streamed_answer_says_images_then_prompt_before_its_first_token(model):
    model.engine.truncate(0)  # nothing of an earlier test's prompt is held
    items = list(model.stream(_messages(range(IMAGES)), max_new_tokens=TOKENS, progress=True))
    progress, responses = _split(items)
    print([(p.stage, p.done, p.total, p.elapsed_s, p.eta_s) for p in progress])
    images = [(p.done, p.total) for p in progress if p.stage == "images"]
    assert images == [(i, IMAGES) for i in range(IMAGES + 1)]
    prompt = [p for p in progress if p.stage == "prompt"]
    last = responses[-1]
    assert [p.stage for p in progress] == ["images"] * (IMAGES + 1) + ["prompt"] * len(prompt)
    # one event before the first block, one per image block, one after the question
    assert len(prompt) == IMAGES + 2 and prompt[0].done == 0 and prompt[0].eta_s is None
    assert prompt[-1].done == prompt[-1].total == last.prompt_tokens - last.stats.reused_tokens
    assert all(a.done < b.done for a, b in zip(prompt, prompt[1:])), "prompt progress must grow"
    assert all(p.eta_s is not None and p.eta_s >= 0 for p in progress[1:] if p.done), progress
    assert all(set(p.as_dict()) == FIELDS for p in progress)

    model.engine.truncate(0)
    plain = list(model.stream(_messages(range(IMAGES)), max_new_tokens=TOKENS))
    assert not any(isinstance(i, Progress) for i in plain), "progress only when asked for"
    assert "".join(r.text for r in plain) == "".join(r.text for r in responses)


def test_no_progress_where_there_is_nothing_slow(model):
    text_only = list(model.stream([{"role": "user", "content": "Hello"}], max_new_tokens=2, progress=True))
    assert not any(isinstance(i, Progress) for i in text_only)
    model.engine.truncate(0)
    list(model.stream(_messages([7]), max_new_tokens=2))
    # the engine holds the image prefix of the same picture: only the new question is evaluated
    again = list(model.stream(_messages([7], "Anything else?"), max_new_tokens=2, progress=True))
    assert not any(isinstance(i, Progress) for i in again), again[:3]


def test_progress_reaches_the_openai_client_before_the_first_token(model):
    from medgemma_edge.server import ServerThread, build_app
    from medgemma_edge.server.backend import LocalBackend

    url = lambda data: "data:image/png;base64," + base64.b64encode(data).decode()  # noqa: E731
    content = [*({"type": "image_url", "image_url": {"url": url(_png(10 + s))}} for s in range(IMAGES)),
               {"type": "text", "text": "Compare these pictures."}]
    with ServerThread(build_app(LocalBackend(model))) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        events, order, text = [], [], []
        for chunk in client.chat.completions.create(model="any", max_tokens=TOKENS, stream=True,
                                                    messages=[{"role": "user", "content": content}]):
            progress = ((chunk.model_extra or {}).get("medgemma_edge") or {}).get("progress")
            if progress:
                events.append(progress)
                order.append("p")
                assert chunk.choices[0].delta.content in (None, "") and chunk.choices[0].finish_reason is None
            elif chunk.choices and chunk.choices[0].delta.content:
                order.append("t")
                text.append(chunk.choices[0].delta.content)
        print("order:", "".join(order), "first:", events[:2], "last:", events[-1])
        assert "p" not in "".join(order).lstrip("p") and "t" in order, "".join(order)
        assert all(set(e) == FIELDS for e in events)
        assert [(e["done"], e["total"]) for e in events if e["stage"] == "images"] == \
            [(i, IMAGES) for i in range(IMAGES + 1)]
        assert events[-1]["stage"] == "prompt" and events[-1]["done"] == events[-1]["total"]
        plain = client.chat.completions.create(model="any", max_tokens=TOKENS,
                                               messages=[{"role": "user", "content": content}])
        assert plain.choices[0].message.content == "".join(text)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _progress(stage, done, total, eta=None):
    return Progress(stage, done, total, float(done), eta)


def test_ask_shows_tqdm_bars_on_a_terminal_and_plain_lines_in_a_log():
    from medgemma_edge.cli.progress import ProgressLines

    items = [_progress("images", i, 3, 12.0 if i == 0 else 2.0 * (3 - i)) for i in range(4)]
    items += [_progress("prompt", d, 800) for d in (0, 260, 520, 800)]
    terminal, log = _Terminal(), io.StringIO()
    for stream in (terminal, log):
        lines = ProgressLines(stream)
        for p in items:
            lines.show(p)
        lines.close()
    shown = terminal.getvalue()
    print(repr(shown[-300:]))
    assert "encoding images" in shown and "3/3" in shown and "about 12 s left" in shown
    assert "reading the prompt" in shown and "800/800" in shown and "\r" in shown  # bars redrawn in place
    assert log.getvalue().splitlines() == ["encoded 1/3 images (1 s)", "encoded 2/3 images (2 s)",
                                           "encoded 3/3 images (3 s)"]


def test_ask_in_a_real_terminal_draws_the_bars(tiny_bundle_f32, tmp_path):
    """`ask` with stderr on a pseudo-terminal (as a person runs it): tqdm's bars are drawn there,
    and stdout (a pipe) gets the answer alone."""
    paths = []
    for s in range(IMAGES):
        paths += ["--image", str(tmp_path / f"p{s}.png")]
        (tmp_path / f"p{s}.png").write_bytes(_png(20 + s))
    primary, secondary = os.openpty()
    drawn = []
    reader = threading.Thread(target=_read_all, args=(primary, drawn), daemon=True)
    reader.start()
    code = "import sys; from medgemma_edge.cli import main; main(sys.argv[1:], prog_name='medgemma-edge')"
    run = subprocess.run([sys.executable, "-c", code, "ask", "-m", str(tiny_bundle_f32), *paths, "--threads",
                          str(THREADS), "--max-tokens", str(TOKENS), "Compare these pictures."],
                         stdout=subprocess.PIPE, stderr=secondary, timeout=300)
    os.close(secondary)
    reader.join(10)
    os.close(primary)
    terminal = b"".join(drawn).decode("utf-8", "replace")
    print(repr(terminal[-400:]))
    assert run.returncode == 0, terminal[-2000:]
    assert "encoding images" in terminal and f"{IMAGES}/{IMAGES}" in terminal and "reading the prompt" in terminal
    assert "encoded 1/" not in terminal, "a terminal gets the bars, not the log lines"
    assert b"encoding images" not in run.stdout and run.stdout.strip(), run.stdout


def _read_all(fd: int, out: list) -> None:
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:  # the other end closed (EIO on Linux)
            return
        if not data:
            return
        out.append(data)
