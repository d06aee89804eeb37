"""A question arriving while a study prepares is answered after at most one image encode plus its
own work (issue 22). The bound is in encode units, not seconds: the vision encoder is slowed down
and every encode's start is recorded, then counted.

First the worker's background lane with fake steps (server/worker.py: one step at a time, only
while no request waits; interleave=False steps are followed by the task's next step; not counted
against --max-queue; errors, cancel and stop reach on_done), then the real thing: the tiny bundle
behind the HTTP server, a CT series prepared on the lane, a chat request sent mid-way."""

import asyncio
import base64
import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from medgemma_edge.runtime.embed_cache import pixel_digest
from medgemma_edge.runtime.errors import InputError
from medgemma_edge.runtime.prepare_steps import PrepareStep
from medgemma_edge.server.worker import Cancelled, QueueFull, Worker
from tests.dicom_helpers import write_series

STEP_S = 0.15  # a fake step's duration
ENCODE_S = 0.5  # what the slowed encoder adds to each encode
SLICES = 6


class Recorder:
    """Fake steps: each records its start and end and whether someone waited (should_pause)."""

    def __init__(self):
        self.events, self.done = [], []

    def starts(self):
        return [e for e in self.events if e[0] == "start"]

    def make(self, n, held=(), fail_at=None, seconds=STEP_S, name="t"):
        """make_steps for a task of n steps; the steps in `held` say interleave=False."""

        def make_steps(should_pause):
            def steps():
                try:
                    for i in range(n):
                        self.events.append(("start", name, i, time.monotonic()))
                        time.sleep(seconds)
                        if i == fail_at:
                            raise InputError("a bad file")
                        self.events.append(("end", name, i, time.monotonic(), should_pause()))
                        yield PrepareStep("encode", i + 1, n, i not in held)
                finally:
                    self.events.append(("closed", name))

            return steps()

        return make_steps

    def on_done(self, err):
        self.done.append(err)


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def _wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def _job(started):
    """An interactive job's run: records when the worker starts it."""
    return lambda cancelled: (started.append(time.monotonic()), ["answer"])[1]


def test_a_request_waits_for_the_current_step_only():
    async def main():
        worker, rec, started = Worker(max_queue=1), Recorder(), []
        worker.start()
        try:
            worker.submit_steps(rec.make(10), on_done=rec.on_done)
            await _wait_for(lambda: len(rec.starts()) >= 3)
            t_submit = time.monotonic()
            job = worker.submit(_job(started))
            assert await job.next() == "answer"
            await _wait_for(lambda: rec.done)
        finally:
            worker.stop()
        between = [e for e in rec.starts() if t_submit < e[3] < started[0]]
        print(f"steps started between the request and its start: {len(between)}")
        assert len(between) <= 1 and rec.done == [None] and len(rec.starts()) == 10

    _run(main())


def test_a_held_state_is_finished_before_the_request():
    """Steps 1 and 2 say interleave=False: a request arriving during step 1 runs after step 3,
    and steps 2 and 3 see should_pause() true."""
    async def main():
        worker, rec, started = Worker(max_queue=4), Recorder(), []
        worker.start()
        try:
            worker.submit_steps(rec.make(6, held=(1, 2), seconds=0.3), on_done=rec.on_done)
            await _wait_for(lambda: len(rec.starts()) >= 2)  # step 1 runs
            job = worker.submit(_job(started))
            assert await job.next() == "answer"
            await _wait_for(lambda: rec.done)
        finally:
            worker.stop()
        ends = {e[2]: e for e in rec.events if e[0] == "end"}
        starts = {e[2]: e[3] for e in rec.starts()}
        print({i: round(starts[i] - started[0], 2) for i in starts})
        assert ends[3][3] <= started[0] < starts[4], "the request went between held steps, or waited longer"
        assert ends[2][4] and ends[3][4], "should_pause() did not say that a request waits"

    _run(main())


def test_background_tasks_do_not_count_against_the_queue():
    async def main():
        worker, rec = Worker(max_queue=1), Recorder()
        worker.start()
        try:
            for k in range(3):
                worker.submit_steps(rec.make(2, name=f"t{k}"), on_done=rec.on_done)
            await _wait_for(lambda: rec.starts())
            assert worker.background == 3 and not worker.busy and not worker.full()
            first = worker.submit(_job([]))
            with pytest.raises(QueueFull):  # --max-queue 1: one request may wait, a second is refused
                worker.submit(_job([]))
            assert await first.next() == "answer"
            await _wait_for(lambda: len(rec.done) == 3)
        finally:
            worker.stop()
        assert rec.done == [None] * 3
        order = [e[1] for e in rec.starts()]
        assert order == sorted(order), f"tasks interleaved with each other: {order}"

    _run(main())


def test_failures_reach_on_done_and_the_worker_goes_on():
    async def main():
        worker, rec = Worker(max_queue=2), Recorder()
        worker.start()
        try:
            worker.submit_steps(lambda should_pause: 1 / 0, on_done=rec.on_done)
            worker.submit_steps(rec.make(3, fail_at=1, name="bad"), on_done=rec.on_done)

            def broken_on_step(step):
                raise RuntimeError("on_step")

            worker.submit_steps(rec.make(3, name="cb"), on_step=broken_on_step, on_done=rec.on_done)
            worker.submit_steps(rec.make(1, name="raising on_done"), on_done=lambda err: 1 / 0)
            worker.submit_steps(rec.make(2, name="good"), on_done=rec.on_done)
            await _wait_for(lambda: len(rec.done) == 4)
            assert await worker.submit(_job([])).next() == "answer"
        finally:
            worker.stop()
        kinds = [type(e).__name__ if e is not None else None for e in rec.done]
        assert kinds == ["ZeroDivisionError", "InputError", "RuntimeError", None], kinds
        assert ("closed", "bad") in rec.events and ("closed", "cb") in rec.events

    _run(main())


def test_cancel_and_stop_end_background_tasks():
    async def main():
        worker, rec = Worker(max_queue=1), Recorder()
        worker.start()
        running = worker.submit_steps(rec.make(50, name="running"), on_done=rec.on_done)
        waiting = worker.submit_steps(rec.make(50, name="waiting"), on_done=rec.on_done)
        await _wait_for(lambda: rec.starts())
        worker.cancel(waiting)  # never started: at once
        assert len(rec.done) == 1 and isinstance(rec.done[0], Cancelled)
        worker.cancel(running)  # at its next step: its generator is closed
        await _wait_for(lambda: len(rec.done) == 2)
        assert isinstance(rec.done[1], Cancelled) and ("closed", "running") in rec.events
        third = worker.submit_steps(rec.make(50, name="third"), on_done=rec.on_done)
        fourth = worker.submit_steps(rec.make(50, name="fourth"), on_done=rec.on_done)
        await _wait_for(lambda: any(e[1] == "third" for e in rec.starts()))
        worker.stop()
        assert len(rec.done) == 4 and all(isinstance(e, Cancelled) for e in rec.done)
        assert ("closed", "third") in rec.events and not any(e[1] == "waiting" or e[1] == "fourth"
                                                              for e in rec.starts())
        late = worker.submit_steps(rec.make(1, name="late"), on_done=rec.on_done)  # a stopped worker
        assert isinstance(rec.done[-1], Cancelled) and not late.started and third.done and fourth.done

    _run(main())


# -- the real thing ------------------------------------------------------------------------------
def _png(seed) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def _study(folder, question=None):
    content = [{"type": "image", "image": str(folder)}]
    if question:
        content.append({"type": "text", "text": question})
    return [{"role": "system", "content": "You are an expert radiologist."}, {"role": "user", "content": content}]


def test_a_question_waits_at_most_one_encode_of_a_preparing_series(tiny_bundle_f32, tmp_path, monkeypatch):
    import medgemma_edge
    from medgemma_edge.runtime.progress import Progress
    from medgemma_edge.server import ServerConfig, ServerThread, build_app
    from medgemma_edge.server.backend import LocalBackend

    folder = tmp_path / "ct"
    write_series(folder, SLICES)
    model = medgemma_edge.load(tiny_bundle_f32, threads=2, context=4096, image_cache_dir=tmp_path / "cache")
    encoder, encodes = model.load_vision(), []  # (start, digest of the view)
    real_encode = encoder.encode

    def slow_encode(view):
        encodes.append((time.monotonic(), pixel_digest(view)))
        time.sleep(ENCODE_S)
        return real_encode(view)

    monkeypatch.setattr(encoder, "encode", slow_encode)
    backend = LocalBackend(model)
    answered = []  # when the question's job began and when its first piece came, on the worker
    real_chat = backend.chat

    def timed_chat(messages, options, cancelled):
        answered.append(time.monotonic())
        for response in real_chat(messages, options, cancelled):
            if len(answered) == 1 and not isinstance(response, Progress):  # the first answer piece
                answered.append(time.monotonic())
            yield response

    monkeypatch.setattr(backend, "chat", timed_chat)
    steps, done = [], []
    question_png = _png(3)
    with ServerThread(build_app(backend, ServerConfig(max_queue=1))) as running:
        worker = running.app.state.medgemma.worker
        worker.submit_steps(lambda should_pause: model.prepare_steps(_study(folder), should_pause=should_pause),
                            on_step=steps.append, on_done=done.append)
        deadline = time.monotonic() + 60
        while len(encodes) < 2:  # the second slice encodes: mid-way through the series
            assert time.monotonic() < deadline and not done, f"the preparation did not start: {done}"
            time.sleep(0.01)
        url = "data:image/png;base64," + base64.b64encode(question_png).decode()
        body = {"max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is shown?"}]}]}
        t_submit = time.monotonic()
        r = httpx.post(running.url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        while not done:
            assert time.monotonic() < deadline + 60, "the preparation never finished"
            time.sleep(0.05)
    series = _study_digests(model, folder)
    own = [t for t, d in encodes if t_submit < t < answered[1] and d not in series]
    before = [t for t, d in encodes if t_submit < t < answered[1] and d in series]
    print(f"encodes of the series that started between the question and its first piece: {len(before)}; "
          f"its own: {len(own)}; waited {answered[0] - t_submit:.2f} s for the model "
          f"(one encode: {ENCODE_S} s + the tiny encoder)")
    assert len(before) <= 1, f"the question waited for {len(before)} encodes of the series"
    assert len(own) == 1 and r.json()["medgemma_edge"]["stats"]["images"] == 1
    assert done == [None] and steps[-1].kind == "saved" and sum(s.kind == "encode" for s in steps) == SLICES
    assert max(t for t, _ in encodes) > answered[1], "the series did not go on after the question"

    n_encodes = len(encodes)
    asked = medgemma_edge.load(tiny_bundle_f32, threads=2, context=4096, image_cache_dir=tmp_path / "cache")
    reply = asked.chat(_study(folder, "Is there a fracture?"), max_new_tokens=2)
    print("the study's question:", reply.stats.as_dict())
    assert reply.stats.restored_tokens >= SLICES * 256 and reply.stats.images_from_cache == SLICES
    assert len(encodes) == n_encodes and asked._vision is None


def _study_digests(model, folder) -> set[str]:
    from medgemma_edge.runtime import prefill
    from medgemma_edge.runtime.picture import DEFAULT_MAX_SLICES
    from medgemma_edge.runtime.reply import Stats

    prompt = prefill.render(model, _study(folder), think=False, window=None, max_slices=DEFAULT_MAX_SLICES, fit=None,
                            stats=Stats())
    return {pixel_digest(v) for v in prompt.views}


def test_an_upload_is_encoded_on_the_lane_also_by_a_backend_without_steps():
    """server/images.py: uploads go to the background lane; a backend with `prepare` only (the
    upstream one) runs it as one step."""
    from medgemma_edge.server import ServerThread, build_app
    from medgemma_edge.server.backend import LocalBackend

    class PrepareOnly:
        model_id, notice = "prepare-only", None
        prepared = []

        def chat(self, messages, options, cancelled):
            return iter(())

        def prepare(self, messages, options):
            self.prepared.append(len(messages[0]["content"][0]["image"]))

    assert hasattr(LocalBackend, "prepare_steps") and not hasattr(PrepareOnly, "prepare_steps")
    with ServerThread(build_app(PrepareOnly())) as running:
        r = httpx.post(running.url + "/v1/images", files={"file": ("x.png", _png(5), "image/png")}, timeout=30)
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 30
        while (state := httpx.get(running.url + "/v1/images/" + r.json()["id"]).json())["status"] == "encoding":
            assert time.monotonic() < deadline
            time.sleep(0.02)
    assert state["status"] == "ready" and PrepareOnly.prepared == [1]
