"""runtime.load → Model.chat / next_token_logits against transformers, on exported bundles."""

import numpy as np
import pytest
from PIL import Image

from medgemma_edge.runtime.errors import InputError
from tests import reference as ref

COS_MIN = 0.9999


def _photo(w, h, seed):
    """A smooth picture with structure (not white noise), so resampling choices matter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([np.sin(9 * x + 3 * y), np.cos(7 * y - 2 * x), np.sin(5 * (x + y))], -1)
    img = (127.5 + 100 * base + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
    return Image.fromarray(img)


def _image_chat(image, text="What does this image show?"):
    return [{"role": "system", "content": "You are an expert radiologist."},
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def _compare(ours, theirs, what):
    ref.assert_same_logits(ours, theirs, what, COS_MIN)


@pytest.fixture(scope="module")
def tiny_model(tiny_bundle_f32):
    import medgemma_edge

    return medgemma_edge.load(tiny_bundle_f32, threads=2, context=2048, fit="stretch")


@pytest.mark.parametrize("size", [(640, 480), (2000, 1400)], ids=["640x480", "2000x1400"])
def test_image_chat_logits_match_transformers(tiny_model, tiny_dir, size):
    msgs = _image_chat(_photo(*size, seed=sum(size)))
    _compare(tiny_model.next_token_logits(msgs), ref.next_token_logits(tiny_dir, msgs), f"image {size}")


def test_greedy_chat_matches_transformers_for_16_tokens(tiny_model, tiny_dir):
    msgs = _image_chat(_photo(500, 700, seed=5), "Describe the findings.")
    want, logits = ref.greedy_generate(tiny_dir, msgs, 16)
    _assert_same_greedy(tiny_model, *_greedy_ids(tiny_model, msgs, 16), want, logits)


def _greedy_ids(model, msgs, n):
    """The token ids the runtime generated (`Response.token`) and its finish reason."""
    *steps, last = model.stream(msgs, max_new_tokens=n)
    return [r.token for r in steps if r.token is not None], last.finish_reason


END = "<end>"


def _assert_same_greedy(model, got, finish, want, logits):
    """Our generated ids equal transformers' greedy ids, token for token and in number: an answer
    that stopped on an end token (not yielded) ends where transformers generated its end token,
    one cut by length has as many tokens as asked. The one allowed difference is a divergence at a
    near-tie of the reference's top-2 logits, after which the two answers cannot be compared."""
    ours = list(got) + ([END] if finish == "stop" else [])
    theirs = [END if t in model.vocab.end_ids or model.engine.is_end(t) else t for t in want]
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            tie, gap = ref.near_tie(logits[i])
            print(f"first divergence at token {i}: {a} vs {b}; top-2 gap {gap:.3g}")
            assert tie, f"greedy output diverges at token {i} without a near-tie (gap {gap:.3g})"
            return
    print(f"{len(got)} tokens ({finish}) equal to transformers'")
    assert ours == theirs, f"ours {ours} ({finish}) vs transformers {theirs}"


def test_text_only_270m_matches_transformers_for_32_tokens(gemma270m_bundle_f32, gemma270m_dir):
    import medgemma_edge

    model = medgemma_edge.load(gemma270m_bundle_f32, threads=2, context=1024)
    for question in ["What are the symptoms of pneumonia?", "Explain what a CT scan measures."]:
        msgs = [{"role": "user", "content": question}]
        want, logits = ref.greedy_generate(gemma270m_dir, msgs, 32)
        _assert_same_greedy(model, *_greedy_ids(model, msgs, 32), want, logits)


def test_streaming_yields_the_same_text(tiny_model):
    msgs = _image_chat(_photo(300, 300, seed=9))
    whole = tiny_model.chat(msgs, max_new_tokens=12)
    responses = list(tiny_model.stream(msgs, max_new_tokens=12))
    *steps, last = responses
    assert "".join(r.text for r in responses) == whole.text
    text_of_tokens = b"".join(tiny_model.engine.piece(r.token) for r in steps).decode("utf-8", "replace")
    assert text_of_tokens == whole.text, (text_of_tokens, whole.text)
    assert all(r.finish_reason is None and r.stats is None for r in steps)
    assert last.finish_reason == whole.finish_reason and last.token is None and last.stats is not None
    assert last.completion_tokens == whole.completion_tokens == len(steps)
    assert sum(bool(r.text) for r in responses) > 1


def test_follow_up_reuses_prefix_and_cache_without_changing_the_answer(tiny_model, tiny_bundle_f32):
    import medgemma_edge

    msgs = _image_chat(_photo(400, 300, seed=11), "Is there an effusion?")
    first = tiny_model.chat(msgs, max_new_tokens=4)
    follow = msgs + [{"role": "assistant", "content": first.text},
                     {"role": "user", "content": "And the heart size?"}]
    warm = tiny_model.next_token_logits(follow)
    fresh = medgemma_edge.load(tiny_bundle_f32, threads=2, context=2048, fit="stretch")
    cold = fresh.next_token_logits(follow)
    assert np.abs(warm - cold).max() < 1e-3, f"worst |d| {np.abs(warm - cold).max():.2e}"
    reply = tiny_model.chat(follow, max_new_tokens=2)
    assert reply.stats.images_from_cache == 1
    assert reply.stats.reused_tokens > 256, reply.stats


def test_prompt_longer_than_context_is_one_clear_error(tiny_bundle_f32):
    import medgemma_edge

    model = medgemma_edge.load(tiny_bundle_f32, threads=2, context=256)
    with pytest.raises(InputError, match="context"):
        model.chat(_image_chat(_photo(64, 64, seed=1)), max_new_tokens=4)
    with pytest.raises(InputError, match="context"):
        model.chat([{"role": "user", "content": "word " * 400}], max_new_tokens=4)


def test_reply_has_stats_and_finish_reason(tiny_model):
    msgs = _image_chat(_photo(200, 100, seed=3))
    reply = tiny_model.chat(msgs, max_new_tokens=3)
    st = reply.stats
    print(reply.finish_reason, reply.completion_tokens, st)
    assert (reply.finish_reason == "length") == (reply.completion_tokens == 3)
    assert reply.prompt_tokens == st.prompt_tokens > 256 and st.images == 1
    assert st.images_from_cache == 0 and st.image_encode_s > 0 and st.preprocess_ms > 0
    assert st.prefill_tok_s > 0 and st.ttft_s >= st.image_encode_s and st.peak_rss_mb > 100
    assert st.load_s == tiny_model.load_s
    # a stop string that is the whole first piece of the answer: finish "stop", nothing shown
    first = next(r for r in tiny_model.stream(msgs, max_new_tokens=1) if r.token is not None)
    piece = tiny_model.engine.piece(first.token).decode("utf-8", "replace")
    assert piece, "the first token has no text of its own"
    stopped = tiny_model.chat(msgs, max_new_tokens=3, stop=piece)
    assert stopped.finish_reason == "stop" and stopped.text == "", (piece, stopped)
    again = tiny_model.chat(msgs, max_new_tokens=3)
    assert again.stats.images_from_cache == 1 and again.text == reply.text


def test_context_grows_to_fit_when_not_fixed(tiny_bundle_f32, monkeypatch):
    import medgemma_edge
    from medgemma_edge.runtime import model as model_mod

    monkeypatch.setattr(model_mod, "AUTO_CONTEXT_START", 512)
    model = medgemma_edge.load(tiny_bundle_f32, threads=2)
    assert model.engine.n_ctx == 512
    msgs = [{"role": "user", "content": [{"type": "image", "image": _photo(64, 64, seed=s)} for s in (1, 2)]
             + [{"type": "text", "text": "Compare."}]}]
    reply = model.chat(msgs, max_new_tokens=2)
    assert reply.prompt_tokens > 512 and model.engine.n_ctx >= reply.prompt_tokens + 2


def test_a_flipped_byte_is_caught_at_load_and_the_hash_is_paid_once(tiny_bundle_f32, tmp_path, monkeypatch):
    """Load hashes each bundle file the first time (remembered by size + mtime + inode in the cache
    folder), so a damaged copy never answers, and later loads are instant."""
    import shutil

    import medgemma_edge
    from medgemma_edge.runtime import manifest as manifest_mod
    from medgemma_edge.runtime.errors import BundleError

    monkeypatch.setenv("MEDGEMMA_EDGE_CACHE", str(tmp_path / "cache"))
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_f32, bundle)
    hashed = []
    real = manifest_mod.sha256_file
    monkeypatch.setattr(manifest_mod, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    medgemma_edge.load(bundle, threads=2, context=256)
    first = len(hashed)
    medgemma_edge.load(bundle, threads=2, context=256)
    # text, vision and the self-check's probe (runtime/selfcheck.py) once, then nothing
    assert first == 3 and "selfcheck.json" in hashed and len(hashed) == first, hashed
    text = next(p for p in bundle.iterdir() if p.suffix == ".gguf" and "mmproj" not in p.name)
    data = bytearray(text.read_bytes())
    data[len(data) // 2] ^= 0x01
    text.unlink()
    text.write_bytes(bytes(data))  # same size, a new file (inode, mtime): hashed again
    with pytest.raises(BundleError, match="sha256"):
        medgemma_edge.load(bundle, threads=2, context=256)
