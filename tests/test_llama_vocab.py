"""tokenizer.gguf (export/gguf_tokenizer.py, no tensors) read by runtime/backends/llama_vocab.LlamaVocab
tokenizes, detokenizes and stops exactly as the bundle's full text GGUF does: on tiny (MedGemma's
multimodal vocabulary) and on the real Gemma 3 270M vocabulary. Exact equality, no tolerance."""

import json

import pytest

STRINGS = [
    "Hi",
    "<start_of_turn>user\nWhat does a pleural effusion look like?<end_of_turn>\n<start_of_turn>model\n",
    "<bos><start_of_turn>user\nYou are an expert radiologist.\n\n<start_of_image><end_of_image>\n\n"
    "Describe the findings.<end_of_turn>\n<start_of_turn>model\n",
    "<start_of_image>" + "<image_soft_token>" * 3 + "<end_of_image>",
    "Température 38,5 °C — SpO₂ 92 %; 日本語のテキスト; emoji 🩺; tabs\tand  double  spaces\n\n",
    "<unused5>literal <end_of_turn> inside text</start_of_turn>",
    "Numbers 1234567890 and code: def f(x): return x**2",
]


def _text_gguf(bundle):
    m = json.loads((bundle / "manifest.json").read_text())
    return bundle / next(f["path"] for f in m["files"] if f["role"] == "text")


def _tokenizer_gguf(src, out):
    from medgemma_edge.export.bundle import ExportPlan
    from medgemma_edge.export.gguf_tokenizer import write_tokenizer_gguf

    plan = ExportPlan.read(src)
    return write_tokenizer_gguf(plan.text, plan.vocab, plan.special, plan.chat_template, out / "tokenizer.gguf")


def _full(path):
    from medgemma_edge.runtime.backends.llama_engine import LlamaEngine

    return LlamaEngine(str(path), n_ctx=64, threads=1)


def _assert_same(vocab, full, what):
    from medgemma_edge.runtime.backends.llama_vocab import LlamaVocab

    assert isinstance(vocab, LlamaVocab)
    assert vocab.n_vocab == full.n_vocab, f"{what}: {vocab.n_vocab} vs {full.n_vocab} tokens"
    assert vocab.end_ids() == full.end_ids()
    for text in STRINGS:
        for special in (True, False):
            a, b = vocab.tokenize(text, special=special), full.tokenize(text, special=special)
            assert a == b, f"{what}: {text[:40]!r} special={special}: {a[:12]} vs {b[:12]}"
    sample = list(range(0, 300)) + list(range(255990, 256010)) + list(range(262100, full.n_vocab)) + \
        list(range(300, full.n_vocab, 997))
    for t in sample:
        for special in (True, False):
            assert vocab.piece(t, special=special) == full.piece(t, special=special), f"{what}: piece {t}"
        assert vocab.is_end(t) == full.is_end(t), f"{what}: is_end {t}"
    print(f"{what}: {len(STRINGS) * 2} tokenizations and {len(sample)} pieces / end tests all equal "
          f"({vocab.n_vocab} tokens, ends {sorted(vocab.end_ids())})")


def test_tiny_tokenizer_gguf_equals_the_text_gguf(tmp_path, tiny_dir, tiny_bundle_f32):
    from medgemma_edge.runtime.backends.llama_vocab import LlamaVocab

    path = _tokenizer_gguf(tiny_dir, tmp_path)
    print(f"tokenizer.gguf: {path.stat().st_size / 1e6:.1f} MB")
    vocab = LlamaVocab(path)
    assert vocab.tokenize("<start_of_image>") == [255999] and vocab.tokenize("<image_soft_token>") == [262144]
    _assert_same(vocab, _full(_text_gguf(tiny_bundle_f32)), "tiny")


def test_270m_tokenizer_gguf_equals_the_text_gguf(tmp_path, gemma270m_dir, gemma270m_bundle_f32, gemma270m_gguf):
    from medgemma_edge.runtime.backends.llama_vocab import LlamaVocab

    vocab = LlamaVocab(_tokenizer_gguf(gemma270m_dir, tmp_path))
    assert vocab.tokenize("<start_of_image>") == [255999]
    _assert_same(vocab, _full(_text_gguf(gemma270m_bundle_f32)), "270M, our f32 export")
    _assert_same(vocab, _full(gemma270m_gguf), "270M, the published Q4_K_M GGUF")


def test_unreadable_tokenizer_is_one_clear_error(tmp_path):
    from medgemma_edge.runtime.backends.llama_vocab import LlamaVocab
    from medgemma_edge.runtime.errors import BundleError

    bad = tmp_path / "tokenizer.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 60)
    with pytest.raises(BundleError, match="tokenizer.gguf") as err:
        LlamaVocab(bad)
    assert "\n" not in str(err.value)
