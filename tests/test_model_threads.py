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


@pytest.mark.parametrize("n_threads", [2, 8])
def test_threads_get_their_own_answers(model, n_threads):
    alone = {i: model.chat(_messages(i), max_new_tokens=6).text for i in range(n_threads)}
    got, errors = {}, []

    def ask(i):
        try:
            got[i] = model.chat(_messages(i), max_new_tokens=6).text
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
    for i in range(n_threads):
        assert isinstance(got[i], BusyError) or got[i] == alone[i], (i, got[i], alone[i])
    print(f"{n_threads} threads: {sum(isinstance(v, BusyError) for v in got.values())} busy, rest equal")


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
