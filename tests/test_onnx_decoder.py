"""`tiny` (linear ×8 rope on its global layers, sliding window 320, like MedGemma 4B shortened)
through the ONNX decoder export (export/onnx_decoder.py) and OnnxTextEngine, against transformers
in float32.

Measured here (fp32, 2 threads): next-token logits agree to max |d| ≈ 2e-6 (cosine 1 - 1e-12) for
text, past the window and with an image block; greedy decoding agrees token for token. The same
graph built with the builder's own sliding-layer rope (×8 there too) lands far away on the long
chat; a causal image block instead of a bidirectional one measurably moves the logits.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from tests import reference as ref

COS_MIN = 0.9999
MAX_ABS = 1e-4  # measured ~2e-6: summation order only
LONG_TEXT = (Path(__file__).parent / "data" / "medical_text.txt").read_text()
CHATS = {
    "short": [{"role": "user", "content": [{"type": "text", "text": "What does a pleural effusion look like?"}]}],
    # longer than tiny's window (320), so local and global layers differ
    "long": [{"role": "system", "content": [{"type": "text", "text": "You are a helpful medical assistant."}]},
             {"role": "user", "content": [{"type": "text", "text": LONG_TEXT +
              " A 67-year-old smoker has had a productive cough, fever and right-sided chest pain "
              "for four days. Which investigations come first, and why?"}]}],
}


class NoVocab:
    """The engine delegates tokenization; these tests feed transformers' token ids directly."""

    def tokenize(self, text, *, special=True):
        raise AssertionError("not used")


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory, tiny_dir):
    from medgemma_edge.export.onnx_decoder import export_decoder, write_embeddings

    root = tmp_path_factory.mktemp("onnx-tiny")
    quiet = lambda s: None
    fixed, unfixed = root / "fp32", root / "fp32-builder-rope"
    return {"fixed": (fixed, export_decoder(tiny_dir, fixed, "fp32", say=quiet),
                      write_embeddings(tiny_dir, fixed, "fp32", say=quiet)),
            "unfixed": (unfixed, export_decoder(tiny_dir, unfixed, "fp32", say=quiet, fix_local_rope=False),
                        write_embeddings(tiny_dir, unfixed, "fp32", say=quiet))}


def _engine(built, n_ctx=2048):
    from medgemma_edge.runtime.backends.onnx_embeddings import EmbeddingTable
    from medgemma_edge.runtime.backends.onnx_text import OnnxTextEngine

    folder, info, emb = built
    return OnnxTextEngine(folder / info["file"], info, EmbeddingTable(folder, emb), NoVocab(), n_ctx=n_ctx, threads=2)


def _compare(name, ours, theirs):
    cos, worst = ref.cosine(ours, theirs), float(np.abs(ours - theirs).max())
    print(f"{name}: cosine {cos:.9f}, worst |d| {worst:.2e}, top-1 {ours.argmax()} vs {theirs.argmax()}")
    return cos, worst


@pytest.fixture(scope="module")
def fixed(tiny_onnx):
    return _engine(tiny_onnx["fixed"])


def test_manifest_entry(tiny_onnx, tiny_dir):
    _, info, emb = tiny_onnx["fixed"]
    text = json.loads((tiny_dir / "config.json").read_text())["text_config"]
    assert info["layer_types"] == ["sliding" if t == "sliding_attention" else "full" for t in text["layer_types"]]
    assert (info["layers"], info["hidden"], info["sliding_window"]) == (6, 256, 320)
    assert info["attention_bias"] == {"sliding": "attention_bias_sliding", "full": "attention_bias_full"}
    assert info["data_files"] == ["decoder.onnx.data"] and info["embed_scale"] == 16.0
    assert emb["files"] == ["embed_tokens.f32.npy"] and emb["rel_rms_error"] == 0


@pytest.mark.parametrize("name", sorted(CHATS))
def test_text_logits_match_transformers(fixed, tiny_dir, name):
    ids = ref.encode_chat(tiny_dir, CHATS[name])["input_ids"][0].tolist()
    if name == "long":
        assert len(ids) > 320 + 8, f"the long chat has {len(ids)} tokens; it must cross the window"
    fixed.reset()
    fixed.eval_tokens(ids[:100])  # two evaluations: a chunk after a cached prefix too
    fixed.eval_tokens(ids[100:])
    cos, worst = _compare(f"{name} ({len(ids)} tokens)", fixed.logits(), ref.next_token_logits(tiny_dir, CHATS[name]))
    assert fixed.logits().argmax() == ref.next_token_logits(tiny_dir, CHATS[name]).argmax()
    assert cos >= COS_MIN and worst < MAX_ABS


def _image_chat():
    from PIL import Image

    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:896, 0:896] / 896
    base = np.stack([np.sin(9 * x + 3 * y), np.cos(7 * y - 2 * x), np.sin(5 * (x + y))], -1)
    pixels = (127.5 + 100 * base + rng.normal(0, 12, (896, 896, 3))).clip(0, 255).astype(np.uint8)
    return [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(pixels)},
                                         {"type": "text", "text": "Describe this image in one line."}]}]


def _image_inputs(tiny_dir):
    """transformers' inputs for the image chat, its image features and its next-token logits."""
    import torch

    msgs = _image_chat()
    inputs = ref.encode_chat(tiny_dir, msgs)
    model, _, _ = ref.load(str(tiny_dir))
    with torch.no_grad():
        theirs = model(**inputs).logits[0, -1].float().numpy()
    feats = ref.image_features(tiny_dir, inputs["pixel_values"].numpy())[0]  # (256, hidden)
    ids = inputs["input_ids"][0].tolist()
    types = inputs["token_type_ids"][0].numpy()
    s = int(np.argmax(types == 1))
    e = s + int((types == 1).sum())
    assert e - s == 256 and (types[s:e] == 1).all()
    return ids, feats, (s, e), theirs


def _eval_image_chat(engine, ids, feats, run, *, bidirectional=True):
    s, e = run
    engine.reset()
    engine.eval_tokens(ids[:s])
    engine.eval_embeddings(feats, [("img", "d", j) for j in range(e - s)], bidirectional=bidirectional)
    engine.eval_tokens(ids[e:])
    return engine.logits().copy()


def test_image_chat_matches_transformers(fixed, tiny_dir):
    """Image features spliced at the image-token run, bidirectional inside the block, against
    transformers' forward with pixel_values and token_type_ids; a causal block must not pass."""
    ids, feats, run, theirs = _image_inputs(tiny_dir)
    cos, worst = _compare(f"image chat ({len(ids)} tokens)", _eval_image_chat(fixed, ids, feats, run), theirs)
    assert fixed.logits().argmax() == theirs.argmax() and cos >= COS_MIN and worst < MAX_ABS
    _, causal_worst = _compare("same, image block causal", _eval_image_chat(fixed, ids, feats, run,
                                                                          bidirectional=False), theirs)
    assert causal_worst > 100 * max(worst, 1e-6), "the image block's bidirectional mask changed nothing"


def test_greedy_16_tokens_past_the_window(fixed, tiny_dir):
    msgs = CHATS["long"]
    ids = ref.encode_chat(tiny_dir, msgs)["input_ids"][0].tolist()
    theirs, their_logits = ref.greedy_generate(tiny_dir, msgs, 16)
    ours, worst = ref.drive_greedy(fixed, ids, theirs, their_logits)
    print(f"greedy from {len(ids)} tokens (window 320): ours {ours}\n  transformers {theirs}; worst |d| {worst:.2e}")
    assert ours == theirs and worst < MAX_ABS


def test_builder_rope_on_sliding_layers_is_wrong(tiny_onnx, fixed, tiny_dir):
    """Without our fix the builder scales the sliding layers' rope ×8 too: far from transformers."""
    msgs = CHATS["long"]
    ids = ref.encode_chat(tiny_dir, msgs)["input_ids"][0].tolist()
    theirs = ref.next_token_logits(tiny_dir, msgs)
    unfixed = _engine(tiny_onnx["unfixed"])
    unfixed.eval_tokens(ids)
    bad_cos, bad_worst = _compare("builder's rope", unfixed.logits(), theirs)
    fixed.reset()
    fixed.eval_tokens(ids)
    cos, worst = _compare("fixed rope", fixed.logits(), theirs)
    assert worst < MAX_ABS and bad_worst > 1000 * max(worst, 1e-6) and bad_cos < COS_MIN


def test_saved_prefix_restores_exactly(tiny_onnx, fixed, tiny_dir):
    """save_state / load_state in a fresh engine, then the question: bit-identical logits; a state
    offered for other keys is refused."""
    ids, feats, (s, e), _ = _image_inputs(tiny_dir)
    straight = _eval_image_chat(fixed, ids, feats, (s, e))
    keys = ids[:s] + [("img", "d", j) for j in range(e - s)]
    fixed.reset()
    fixed.eval_tokens(ids[:s])
    fixed.eval_embeddings(feats, keys[s:])
    blob = fixed.save_state()
    other = _engine(tiny_onnx["fixed"])
    assert not other.load_state(blob, keys[:-1]) and other.n_past == 0
    assert other.load_state(blob, keys) and other.n_past == e
    other.eval_tokens(ids[e:])
    print(f"state of {e} positions: {len(blob) / 2**20:.1f} MiB; max |d| {np.abs(other.logits() - straight).max():.1e}")
    assert np.array_equal(other.logits(), straight)


def test_sync_prefix_reuses_the_cache(fixed, tiny_dir):
    ids = ref.encode_chat(tiny_dir, CHATS["long"])["input_ids"][0].tolist()
    fixed.reset()
    fixed.eval_tokens(ids[:-1])
    fixed.eval_tokens(ids[-1:])  # the path sync_prefix takes: the last position alone
    want = fixed.logits().copy()
    fixed.eval_tokens([5, 6, 7])  # another continuation, then back
    keep = fixed.sync_prefix(ids)
    assert keep == len(ids) - 1
    fixed.eval_tokens(ids[keep:])
    assert np.array_equal(fixed.logits(), want)


def test_attention_bias_rules():
    from medgemma_edge.runtime.backends.onnx_text import attention_bias

    blocks = np.array([-1, -1, 0, 0, 0, -1, 1, 1])  # text, text, image 0 (3), text, image 1 (2)
    seen = attention_bias(blocks, 0, 8, None)[0, 0] == 0
    want = np.tril(np.ones((8, 8), bool))
    want[2:5, 2:5] = True
    want[6:8, 6:8] = True
    assert (seen == want).all()
    window = attention_bias(blocks, 5, 3, 2)[0, 0] == 0  # rows 5..7, window 2
    assert window.astype(int).tolist() == [[0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1]]


def test_int8_embedding_rows(tmp_path, tiny_dir):
    from medgemma_edge.export.checkpoint import open_checkpoint, read_rows
    from medgemma_edge.export.onnx_decoder import write_embeddings
    from medgemma_edge.runtime.backends.onnx_embeddings import EmbeddingTable

    emb = write_embeddings(tiny_dir, tmp_path, "int8", say=lambda s: None)
    table = EmbeddingTable(tmp_path, emb)
    ids = [0, 2, 106, 262144, 262207]
    exact = read_rows(open_checkpoint(tiny_dir).tensors[("text", "embed_tokens.weight")])[ids]
    got = table.rows(ids)
    rel = np.linalg.norm(got - exact) / np.linalg.norm(exact)
    print(f"int8 rows: {emb['bytes'] / 2**20:.1f} MiB, table relative RMS error {emb['rel_rms_error']:.2e}, "
          f"these rows {rel:.2e}, worst |d| {np.abs(got - exact).max():.2e}")
    # Per-row absmax/127 on tiny's Gaussian rows of 256: measured 0.70 % relative RMS (a step of
    # ~4.3σ/127, /√12); a scale off by 2× or a wrong row gives tens of %.
    assert emb["rel_rms_error"] < 0.015 and rel < 0.015
    assert emb["bytes"] < 0.3 * 262208 * 256 * 4


def test_quality_reference_gives_every_position(tmp_path, tiny_dir, fixed):
    """The quality report's fp32 reference is built with its LM head on every position and read
    128 positions a step (export/bundle_onnx.teacher_forced); each row must be transformers' for
    that position, and the bundle's graph read one position a step must give the same rows."""
    from medgemma_edge.export.bundle_onnx import ALL_POSITIONS, TEACHER_CHUNK, teacher_forced
    from medgemma_edge.export.onnx_decoder import export_decoder, write_embeddings

    quiet = lambda s: None
    every = _engine((tmp_path, export_decoder(tiny_dir, tmp_path, "fp32", say=quiet, options=ALL_POSITIONS),
                     write_embeddings(tiny_dir, tmp_path, "fp32", say=quiet)))
    ids = ref.encode_chat(tiny_dir, CHATS["long"])["input_ids"][0].tolist()
    assert len(ids) > 2 * TEACHER_CHUNK, "the sequence must take several chunks"
    theirs = ref.logits_for_ids(tiny_dir, ids)
    chunked, stepped = teacher_forced(every, ids), teacher_forced(fixed, ids)
    for name, ours in (("every position, chunked", chunked), ("last position, one step each", stepped)):
        worst = float(np.abs(ours - theirs).max())
        agree = float((ours.argmax(1) == theirs.argmax(1)).mean())
        print(f"{name}: {len(ids)} rows, worst |d| {worst:.2e}, top-1 agreement {agree:.4f}")
        assert worst < MAX_ABS and agree == 1.0
