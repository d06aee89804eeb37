"""Decoding beside other programs: llama.cpp's threads spin while they wait for each other, so
with a core taken by another program, one thread fewer decodes faster (benchmarks/results/ holds the
measurements). The runtime measures the others' CPU use between its steps and runs beside it; a
quiet machine keeps every thread."""

import numpy as np
import pytest

from medgemma_edge.runtime import machine


class FakeClock:
    def __init__(self, machine_busy, own_busy):
        self.t, self.machine, self.own = 0.0, machine_busy, own_busy


@pytest.fixture
def fake(monkeypatch):
    clock = FakeClock(0.0, 0.0)
    monkeypatch.setattr(machine.time, "monotonic", lambda: clock.t)
    monkeypatch.setattr(machine, "_machine_busy_s", lambda: clock.machine)
    monkeypatch.setattr(machine, "_own_busy_s", lambda: clock.own)
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 2)
    return clock


def test_others_load_is_the_machine_minus_us(fake):
    load = machine.OthersLoad()
    fake.t, fake.machine, fake.own = 1.0, 1.9, 1.0  # we used 1 core-second, someone else 0.9
    assert load.cores() == pytest.approx(0.9)
    fake.t, fake.machine, fake.own = 2.0, 3.9, 3.0  # then only us, on both cores
    assert load.cores() == pytest.approx(0.0)
    fake.t = 2.01  # too short a window to say anything
    assert load.cores() is None


@pytest.mark.parametrize("others,wanted,threads", [(None, 2, 2), (0.0, 2, 2), (0.3, 2, 2), (0.9, 2, 1),
                                                   (1.6, 2, 1), (5.0, 2, 1), (0.9, 1, 1)])
def test_threads_beside_the_others(fake, others, wanted, threads):
    assert machine.threads_beside(others, wanted) == threads


def test_the_answer_does_not_depend_on_the_thread_count(tiny_bundle_f32, monkeypatch):
    """Beside a busy program the model runs one thread; ggml splits work by output rows (each dot
    product is summed by one thread, in the same order), so the prompt's logits and the greedy
    answer are bit-identical to what two threads give (docs/cli.md's claim)."""
    import medgemma_edge
    from medgemma_edge.runtime import model as model_mod

    model = medgemma_edge.load(tiny_bundle_f32, threads=2, context=1024)
    msgs = [{"role": "user", "content": "Name a cause of chest pain, and say why it hurts."}]

    def answer(threads):
        """(greedy token ids, logits after the whole prompt) with `threads` chosen for every step."""
        monkeypatch.setattr(model_mod, "threads_beside", lambda others, wanted: threads)
        model.engine.reset()  # nothing reused: every prompt position evaluated with these threads
        ids = [r.token for r in model.stream(msgs, max_new_tokens=24) if r.token is not None]
        assert model.engine.active_threads == threads
        model.engine.reset()
        return ids, model.next_token_logits(msgs)  # the whole prompt again, not one token

    # a quiet machine, whatever else runs beside the tests (else the runtime rightly takes 1 thread)
    quiet_ids, quiet_logits = answer(2)
    busy_ids, busy_logits = answer(1)  # a busy machine
    worst = float(np.abs(busy_logits - quiet_logits).max())
    print(f"1 vs 2 threads: worst |d| of the prompt's logits {worst:.2e}; ids {busy_ids} vs {quiet_ids}")
    assert len(quiet_ids) == 24, quiet_ids  # the whole answer is compared, not an early stop
    assert busy_ids == quiet_ids, f"greedy answers differ: {busy_ids} vs {quiet_ids}"
    assert np.array_equal(busy_logits, quiet_logits), f"logits not bit-identical: worst |d| {worst:.2e}"
