"""Preparing a study step by step (runtime/prepare_steps.py): the steps run to the end leave the
same prefix as `Model.prepare`, a question between two blocks changes neither answer, and greedy
answers (token ids) equal the cold answer of a model that prepared nothing."""

import numpy as np
import pytest

from tests.dicom_helpers import write_series

SYSTEM = "You are an expert radiologist."
SLICES = 3
TOKENS = 6


def _load(bundle, cache=None):
    import medgemma_edge

    return medgemma_edge.load(bundle, threads=2, context=2048, image_cache_dir=cache)


def _study(folder, question=None, system=SYSTEM):
    content = [{"type": "image", "image": str(folder)}]
    if question:
        content.append({"type": "text", "text": question})
    return [{"role": "system", "content": system}, {"role": "user", "content": content}]


def _picture(seed):
    return np.random.default_rng(seed).integers(0, 256, (120, 150, 3), dtype=np.uint8)


def _other(seed=11):
    """An unrelated question about another picture."""
    return [{"role": "user", "content": [{"type": "image", "image": _picture(seed)},
                                         {"type": "text", "text": "What is shown?"}]}]


def _answer(model, messages):
    ids, last = [], None
    for r in model.stream(messages, max_new_tokens=TOKENS):
        if r.token is not None:
            ids.append(r.token)
        last = r
    return ids, last.stats


def _same(got, want, what):
    differ = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    assert got == want, f"{what}: token ids differ from position {differ}: {got} vs {want}"


def _count_calls(monkeypatch, obj, name):
    calls = []
    real = getattr(obj, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, counted)
    return calls


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ct") / "series"
    write_series(folder, SLICES)
    return folder


@pytest.fixture(scope="module")
def cold(tiny_bundle_f32, series):
    """Answers of a model with no image cache folder, nothing prepared."""
    model = _load(tiny_bundle_f32)
    return {"study": _answer(model, _study(series, "Is there a fracture?"))[0], "other": _answer(model, _other())[0]}


def test_steps_to_the_end_leave_what_prepare_leaves(tiny_bundle_f32, series, cold, tmp_path):
    model = _load(tiny_bundle_f32, tmp_path / "steps")
    steps = list(model.prepare_steps(_study(series)))
    kinds = [s.kind for s in steps]
    print(kinds, [(s.done, s.total, s.interleave) for s in steps])
    assert kinds == ["encode"] * SLICES + ["evaluate"] * (SLICES - 1) + ["saved"]
    assert all(s.interleave for s in steps[:SLICES]) and not any(s.interleave for s in steps[SLICES:-1])
    assert [s.done for s in steps] == list(range(1, 2 * SLICES + 1)) and steps[-1].total == 2 * SLICES
    assert steps[-1].stats.images == SLICES and steps[-1].stats.images_from_cache == 0

    prepared = _load(tiny_bundle_f32, tmp_path / "prepare")
    stats = prepared.prepare(_study(series))
    assert stats.images == SLICES and stats.restored_tokens == 0 and stats.image_encode_s > 0

    question = _study(series, "Is there a fracture?")
    answers = {}
    for name in ("steps", "prepare"):
        asked = _load(tiny_bundle_f32, tmp_path / name)  # a new Model: nothing in memory
        answers[name], st = _answer(asked, question)
        print(name, st.restored_tokens, "of", st.prompt_tokens, "restored; images from cache", st.images_from_cache)
        assert st.restored_tokens >= SLICES * 256 and st.images_from_cache == st.images == SLICES
        assert asked._vision is None, "a prepared study must not load the vision encoder"
    _same(answers["steps"], answers["prepare"], "after prepare_steps vs after prepare")
    _same(answers["steps"], cold["study"], "after prepare_steps vs cold")


@pytest.mark.parametrize("mode", ["disk", "memory", "unpaused"])
def test_a_question_between_blocks_changes_no_answer(tiny_bundle_f32, series, cold, tmp_path, monkeypatch, mode):
    """disk / memory: should_pause is true, the partial state is saved there and restored (each
    block evaluated once). unpaused: no should_pause, someone uses the model anyway after an
    interleave=False step: the preparation evaluates again from what the engine holds."""
    model = _load(tiny_bundle_f32, tmp_path if mode == "disk" else None)
    blocks = _count_calls(monkeypatch, model.engine, "eval_embeddings")
    saved = []
    real_put = model.image_cache.put_blob
    monkeypatch.setattr(model.image_cache, "put_blob", lambda key, data: (saved.append(key), real_put(key, data)))
    pause = None if mode == "unpaused" else (lambda: True)
    steps = model.prepare_steps(_study(series), should_pause=pause)
    step = next(steps)
    while step.kind != "evaluate":
        step = next(steps)
    assert step.interleave == (mode != "unpaused") and step.done == SLICES + 1
    before = len(blocks)
    other, st = _answer(model, _other())
    _same(other, cold["other"], "the question between two blocks")
    assert st.images == 1
    del blocks[before:]  # the other question's own block
    rest = list(steps)
    assert rest[-1].kind == "saved" and rest[-1].done == rest[-1].total == 2 * SLICES
    print(mode, "blocks evaluated by the preparation:", len(blocks), "blobs written:", len(saved))
    if mode == "unpaused":
        assert len(blocks) > SLICES  # the disturbed prefix was evaluated again
    else:
        assert len(blocks) == SLICES, "the paused state was not restored"
    partial = [k for k in saved if k.endswith(".partial")]
    assert (len(partial) > 0) == (mode == "disk")
    assert not any(model.image_cache.has_blob(k) for k in partial), "a partial state was left on disk"

    asked = _load(tiny_bundle_f32, tmp_path) if mode == "disk" else model
    got, st = _answer(asked, _study(series, "Is there a fracture?"))
    print(f"study question: restored {st.restored_tokens}, reused {st.reused_tokens} of {st.prompt_tokens}")
    assert (st.restored_tokens if mode == "disk" else st.reused_tokens) >= SLICES * 256
    _same(got, cold["study"], f"the study question after an interleaved preparation ({mode})")


def test_a_study_whose_images_are_cached_encodes_nothing(tiny_bundle_f32, series, tmp_path, monkeypatch):
    model = _load(tiny_bundle_f32, tmp_path)
    model.prepare(_study(series))
    encodes = _count_calls(monkeypatch, model.load_vision(), "encode")
    steps = list(model.prepare_steps(_study(series, system="Be brief.")))  # another prefix, the same images
    print([s.kind for s in steps])
    assert [s.kind for s in steps] == ["evaluate"] * (SLICES - 1) + ["saved"] and encodes == []
    assert steps[-1].stats.images_from_cache == SLICES and steps[-1].total == SLICES


def test_a_prepared_study_is_one_skipped_step(tiny_bundle_f32, series, tmp_path):
    _load(tiny_bundle_f32, tmp_path).prepare(_study(series))
    model = _load(tiny_bundle_f32, tmp_path)
    steps = list(model.prepare_steps(_study(series)))
    assert [s.kind for s in steps] == ["skipped"] and steps[0].interleave
    assert steps[0].stats.restored_tokens >= SLICES * 256 and model._vision is None
    stats = model.prepare(_study(series))  # what `medgemma-edge encode` reads as "already prepared"
    assert stats.restored_tokens and not stats.image_encode_s
    text_only = list(model.prepare_steps([{"role": "user", "content": "Hello"}]))
    assert [s.kind for s in text_only] == ["skipped"] and text_only[0].stats.restored_tokens == 0


def test_closing_a_paused_preparation_leaves_no_partial_state(tiny_bundle_f32, series, tmp_path, monkeypatch):
    model = _load(tiny_bundle_f32, tmp_path)
    saved = []
    real_put = model.image_cache.put_blob
    monkeypatch.setattr(model.image_cache, "put_blob", lambda key, data: (saved.append(key), real_put(key, data)))
    steps = model.prepare_steps(_study(series), should_pause=lambda: True)
    while next(steps).kind != "evaluate":
        pass
    assert saved and all(model.image_cache.has_blob(k) for k in saved)
    steps.close()
    assert not any(model.image_cache.has_blob(k) for k in saved)
    assert model._lock.acquire(blocking=False), "the model's lock is held between steps"
    model._lock.release()


def test_onnx_pauses_and_resumes(onnx_bundles, tmp_path, monkeypatch):
    """The ONNX engine's save_state / load_state serve a paused preparation alike."""
    bundle = onnx_bundles("fp32").bundle
    folder = tmp_path / "ct"
    write_series(folder, 2)
    question = _study(folder, "Is there a fracture?")
    want, _ = _answer(_load(bundle), question)
    model = _load(bundle, tmp_path / "cache")
    blocks = _count_calls(monkeypatch, model.engine, "eval_embeddings")
    steps = model.prepare_steps(_study(folder), should_pause=lambda: True)
    while (step := next(steps)).kind != "evaluate":
        pass
    assert step.interleave
    model.chat(_other(), max_new_tokens=2)
    del blocks[-1:]
    assert list(steps)[-1].kind == "saved" and len(blocks) == 2
    got, st = _answer(_load(bundle, tmp_path / "cache"), question)
    assert st.restored_tokens >= 2 * 256
    _same(got, want, "ONNX: the study question after an interleaved preparation")

