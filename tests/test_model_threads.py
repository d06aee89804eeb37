"""One `Model`, many threads: every answer equals the one the same question gets alone, or a
clear BusyError; never a crash, never another caller's tokens (issue: two threads on one model
once gave a false "context full" error and then a segfault inside llama_decode)."""

import threading

import numpy as np
import pytest

from medgemma_edge.runtime.errors import BusyError

QUESTIONS = ["What is a normal heart rate?", "Name a cause of chest pain.", "Define pneumonia.",
             "What does the liver do?"]


def _picture(seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)


def _messages(i):
    if i % 2:  # text and image questions mixed
        return [{"role": "user", "content": [{"type": "image", "image": _picture(i)},
                                             {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]}]
    return [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]


@pytest.fixture(scope="module")
def model(tiny_bundle_f32):
    import medgemma_edge

    return medgemma_edge.load(tiny_bundle_f32, threads=2, context=2048)


def _answer(model, i):
    """(generated token ids, text, finish reason) of question i: the whole answer, as streamed."""
    *steps, last = model.stream(_messages(i), max_new_tokens=6)
    return [r.token for r in steps], "".join(r.text for r in steps) + last.text, last.finish_reason


class EngineWatch:
    """Records which thread enters the engine's evaluation calls, in order. A second thread entering
    while another is inside raises before llama.cpp is reached (two threads in llama_decode at once
    crash), so a broken lock fails the test instead of crashing it."""

    CALLS = ("eval_tokens", "eval_embeddings", "logits", "truncate", "reset")

    def __init__(self, engine, monkeypatch):
        self.guard, self.owner, self.depth, self.order = threading.Lock(), None, 0, []
        for name in self.CALLS:
            monkeypatch.setattr(engine, name, self._watched(getattr(engine, name)))

    def _watched(self, call):
        def run(*args, **kwargs):
            me = threading.get_ident()
            with self.guard:
                if self.owner not in (None, me):
                    raise AssertionError(f"two callers inside the engine at once ({call.__name__})")
                self.owner, self.depth = me, self.depth + 1
                self.order.append(me)
            try:
                return call(*args, **kwargs)
            finally:
                with self.guard:
                    self.depth -= 1
                    if self.depth == 0:
                        self.owner = None
        return run

    def turns(self) -> list:
        """The threads in the order they held the engine, one entry per unbroken run of calls."""
        return [t for k, t in enumerate(self.order) if k == 0 or self.order[k - 1] != t]


@pytest.mark.parametrize("n_threads,wait_s", [(2, None), (8, None), (8, 0.01)],
                         ids=["2-wait", "8-wait", "8-busy"])
def test_threads_get_their_own_answers(model, monkeypatch, n_threads, wait_s):
    """Callers are served one whole answer at a time: every answer that comes is the complete
    answer the question gets alone. With the default wait (far longer than this test) every caller
    is answered; with a tiny wait the callers that find the model busy get BusyError, and the one
    holding the model still gets its answer."""
    alone = {i: _answer(model, i) for i in range(n_threads)}
    assert all(a[0] for a in alone.values()), alone  # answers with tokens to compare
    watch = EngineWatch(model.engine, monkeypatch)
    if wait_s is not None:
        monkeypatch.setattr(model, "busy_wait_s", wait_s)
    got, errors, answered_by = {}, [], {}

    def ask(i):
        try:
            got[i] = _answer(model, i)
            answered_by[threading.get_ident()] = i
        except BusyError as err:
            got[i] = err
        except Exception as err:  # anything else is a defect
            errors.append((i, repr(err)))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    assert not errors, errors
    busy = [i for i in range(n_threads) if isinstance(got[i], BusyError)]
    print(f"{n_threads} threads, wait {wait_s}: {len(busy)} busy, {n_threads - len(busy)} answered; "
          f"engine turns {len(watch.turns())}")
    for i in range(n_threads):
        if i not in busy:
            assert got[i] == alone[i], (i, got[i], alone[i])  # ids, text and finish reason
    if wait_s is None:
        assert not busy, f"callers {busy} got BusyError although they may wait {model.busy_wait_s} s"
    else:
        assert all("stayed busy" in str(got[i]) for i in busy), [str(got[i]) for i in busy]
    assert len(busy) < n_threads, "nobody was answered"
    # one answer at a time: each answered caller held the engine in one unbroken turn
    turns = watch.turns()
    assert sorted(turns) == sorted(answered_by) and len(turns) == len(set(turns)), turns


def test_a_second_caller_waits_then_gets_busy(model):
    stream = model.stream(_messages(0), max_new_tokens=4)
    next(stream)  # this caller now holds the model
    model.busy_wait_s = 0.2
    try:
        result = []
        t = threading.Thread(target=lambda: result.append(_try(model)))
        t.start()
        t.join(30)
        assert isinstance(result[0], BusyError), result
        with pytest.raises(BusyError, match="still reading"):  # the same thread, nested
            model.chat(_messages(0), max_new_tokens=1)
    finally:
        model.busy_wait_s = 600.0
        stream.close()  # closing the stream frees the model
    assert model.chat(_messages(0), max_new_tokens=2).finish_reason in ("stop", "length")


def _try(model):
    try:
        return model.chat(_messages(2), max_new_tokens=2)
    except BusyError as err:
        return err
