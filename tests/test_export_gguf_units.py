"""GGUF export pieces without a full export: name table, transforms, vocabulary, checkpoint and
manifest errors. Synthetic inputs, a few seconds in all."""

import json
import shutil

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from medgemma_edge.export import gguf_tensors as gt
from medgemma_edge.export.checkpoint import open_checkpoint
from medgemma_edge.export.vocab import CONTROL, UNUSED, Vocab, fit_vocab, read_vocab, special_token_ids
from medgemma_edge.runtime.errors import BundleError, ExportError

# -- names: every tensor kind of a Gemma 3 / MedGemma checkpoint → the GGUF name llama.cpp's Gemma 3
# graph and clip loader read (REFERENCE.md), and whether it gets Gemma's +1 -------------------

EXPECTED_NAMES = [
    ("text", "embed_tokens.weight", "token_embd.weight", False),
    ("text", "lm_head.weight", "output.weight", False),
    ("text", "norm.weight", "output_norm.weight", True),
    ("text", "layers.3.input_layernorm.weight", "blk.3.attn_norm.weight", True),
    ("text", "layers.3.self_attn.q_proj.weight", "blk.3.attn_q.weight", False),
    ("text", "layers.3.self_attn.k_proj.weight", "blk.3.attn_k.weight", False),
    ("text", "layers.3.self_attn.v_proj.weight", "blk.3.attn_v.weight", False),
    ("text", "layers.3.self_attn.o_proj.weight", "blk.3.attn_output.weight", False),
    ("text", "layers.3.self_attn.q_norm.weight", "blk.3.attn_q_norm.weight", True),
    ("text", "layers.3.self_attn.k_norm.weight", "blk.3.attn_k_norm.weight", True),
    ("text", "layers.3.post_attention_layernorm.weight", "blk.3.post_attention_norm.weight", True),
    ("text", "layers.3.pre_feedforward_layernorm.weight", "blk.3.ffn_norm.weight", True),
    ("text", "layers.3.post_feedforward_layernorm.weight", "blk.3.post_ffw_norm.weight", True),
    ("text", "layers.3.mlp.gate_proj.weight", "blk.3.ffn_gate.weight", False),
    ("text", "layers.3.mlp.up_proj.weight", "blk.3.ffn_up.weight", False),
    ("text", "layers.61.mlp.down_proj.weight", "blk.61.ffn_down.weight", False),  # 27B depth
    ("vision", "embeddings.patch_embedding.weight", "v.patch_embd.weight", False),
    ("vision", "embeddings.patch_embedding.bias", "v.patch_embd.bias", False),
    ("vision", "embeddings.position_embedding.weight", "v.position_embd.weight", False),
    ("vision", "encoder.layers.26.layer_norm1.weight", "v.blk.26.ln1.weight", False),
    ("vision", "encoder.layers.2.layer_norm1.bias", "v.blk.2.ln1.bias", False),
    ("vision", "encoder.layers.2.self_attn.q_proj.weight", "v.blk.2.attn_q.weight", False),
    ("vision", "encoder.layers.2.self_attn.k_proj.bias", "v.blk.2.attn_k.bias", False),
    ("vision", "encoder.layers.2.self_attn.v_proj.weight", "v.blk.2.attn_v.weight", False),
    ("vision", "encoder.layers.2.self_attn.out_proj.weight", "v.blk.2.attn_out.weight", False),
    ("vision", "encoder.layers.2.layer_norm2.weight", "v.blk.2.ln2.weight", False),
    ("vision", "encoder.layers.2.mlp.fc1.weight", "v.blk.2.ffn_up.weight", False),
    ("vision", "encoder.layers.2.mlp.fc2.weight", "v.blk.2.ffn_down.weight", False),
    ("vision", "post_layernorm.weight", "v.post_ln.weight", False),
    ("projector", "mm_input_projection_weight", "mm.input_projection.weight", False),
    ("projector", "mm_soft_emb_norm.weight", "mm.soft_emb_norm.weight", True),
]


@pytest.mark.parametrize("part,hf,want,plus_one", EXPECTED_NAMES, ids=[e[1] for e in EXPECTED_NAMES])
def test_names_and_transforms(part, hf, want, plus_one):
    mapped = gt.map_name(part, hf)
    assert mapped.gguf_name == want, f"{part}:{hf}: ours {mapped.gguf_name}, llama.cpp reads {want}"
    assert mapped.kind == (gt.GEMMA_NORM if plus_one else gt.KEEP)


def test_every_allowed_tensor_kind_is_covered_above():
    """The allow-list (gguf_tensors.TENSORS) holds exactly the kinds listed in EXPECTED_NAMES."""
    seen = {part: set() for part in gt.TENSORS}
    for part, hf, _, _ in EXPECTED_NAMES:
        arch, prefix = gt.PARTS[part]
        stem = hf.rsplit(".", 1)[0] if not hf.endswith("_weight") else hf[: -len("_weight")]
        found = gt._name_map(arch).get_type_and_name(prefix + stem) or gt._name_map(arch).get_type_and_name(stem)
        seen[part].add(found[0])
    assert seen == {part: set(kinds) for part, kinds in gt.TENSORS.items()}


def test_plus_one_is_gemmas_norm_rule():
    rows = np.array([[0.25, -1.0]], np.float32)
    np.testing.assert_array_equal(gt.transform(gt.GEMMA_NORM, rows), rows + 1)
    np.testing.assert_array_equal(gt.transform(gt.KEEP, rows), rows)


def test_unknown_tensor_is_an_export_error():
    with pytest.raises(ExportError, match="no GGUF name"):
        gt.map_name("text", "layers.0.mystery.weight")


@pytest.mark.parametrize("name,shape,quant,want", [
    ("blk.0.attn_norm.weight", (256,), "q8_0", gt.Q.F32),
    ("blk.0.attn_q.weight", (256, 256), "q8_0", gt.Q.Q8_0),
    ("blk.0.attn_q.weight", (256, 256), "bf16", gt.Q.BF16),
    ("blk.0.attn_q.weight", (256, 100), "q8_0", gt.Q.F16),  # rows not whole 32-blocks
    ("v.patch_embd.weight", (256, 3, 14, 14), "f16", gt.Q.F32),
    ("v.position_embd.weight", (4096, 256), "q8_0", gt.Q.F32),
    ("mm.input_projection.weight", (256, 256), "q8_0", gt.Q.F16),
    ("mm.input_projection.weight", (256, 256), "f32", gt.Q.F32),
    ("v.blk.0.attn_q.weight", (256, 256), "q8_0", gt.Q.Q8_0),
])
def test_storage_types(name, shape, quant, want):
    assert gt.storage_type(name, shape, quant) == want


# -- vocabulary ---------------------------------------------------------------------------------

def _vocab(n_pieces, added=()):
    tokens = [f"t{i}" for i in range(n_pieces)] + list(added)
    return Vocab(tokens, [0.0] * len(tokens), [1] * len(tokens), "test", len(tokens), n_pieces)


def test_vocab_is_padded_with_unused_placeholders_up_to_the_embedding():
    v = _vocab(6, ["<unused4>", "<image_soft_token>"])
    fitted = fit_vocab(v, 11)
    assert len(fitted.tokens) == 11 and fitted.padded and fitted.tokenizer_entries == 8
    assert fitted.tokens[8:] == ["<unused5>", "<unused6>", "<unused7>"]
    assert fitted.types[8:] == [UNUSED] * 3


def test_vocab_drops_added_tokens_without_an_embedding_row():
    fitted = fit_vocab(_vocab(6, ["<image_soft_token>"]), 6)
    assert fitted.tokens == [f"t{i}" for i in range(6)] and fitted.dropped == ["<image_soft_token>"]
    assert not fitted.padded


def test_vocab_larger_than_embedding_is_an_error():
    with pytest.raises(ExportError, match="belongs to another model"):
        fit_vocab(_vocab(10), 8)


def test_real_tokenizer_reads_with_medgemma_ids(tiny_dir):
    v = read_vocab(tiny_dir)
    assert v.source == "tokenizer.model" and v.tokenizer_entries == 262145
    assert v.types[262144] == CONTROL and v.tokens[262144] == "<image_soft_token>"
    ids = special_token_ids(fit_vocab(v, 262208), multimodal=True)
    assert ids == {"bos": 2, "eos": 1, "pad": 0, "start_of_turn": 105, "end_of_turn": 106,
                   "start_of_image": 255999, "end_of_image": 256000, "image_soft_token": 262144}


def test_tokenizer_json_fallback_orders_merges_like_the_sentencepiece_scores(tiny_dir, tmp_path):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / f, tmp_path / f)
    from_json, from_sp = read_vocab(tmp_path), read_vocab(tiny_dir)
    assert from_json.source == "tokenizer.json" and from_json.tokens == from_sp.tokens
    normal = [i for i, t in enumerate(from_sp.types) if t == 1]
    sp_order = np.argsort(-np.array(from_sp.scores)[normal], kind="stable")
    json_order = np.argsort(-np.array(from_json.scores)[normal], kind="stable")
    assert np.array_equal(sp_order, json_order), "merge priority differs between the two sources"
    differ = sum(a != b for a, b in zip(from_json.types, from_sp.types))
    print(f"token types differing between tokenizer.json and tokenizer.model: {differ}")
    assert differ <= 4


# -- checkpoints --------------------------------------------------------------------------------

def _text_checkpoint(path, *, vocab=512, hidden=64, layers=1, arch="Gemma3ForCausalLM", tokenizer_from=None):
    """A minimal Gemma 3 text checkpoint with the right shapes (random weights)."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    heads, kv, head_dim, ff = 2, 1, 32, 128
    t = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t |= {p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
              p + "self_attn.k_proj.weight": (kv * head_dim, hidden),
              p + "self_attn.v_proj.weight": (kv * head_dim, hidden),
              p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
              p + "self_attn.q_norm.weight": (head_dim,), p + "self_attn.k_norm.weight": (head_dim,),
              p + "mlp.gate_proj.weight": (ff, hidden), p + "mlp.up_proj.weight": (ff, hidden),
              p + "mlp.down_proj.weight": (hidden, ff)}
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm"):
            t[p + n + ".weight"] = (hidden,)
    weights = {k: rng.standard_normal(s).astype(np.float32) for k, s in t.items()}
    save_file(weights, str(path / "model.safetensors"))
    cfg = {"architectures": [arch], "model_type": "gemma3_text", "vocab_size": vocab, "hidden_size": hidden,
           "intermediate_size": ff, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "head_dim": head_dim, "query_pre_attn_scalar": head_dim, "sliding_window": 16}
    (path / "config.json").write_text(json.dumps(cfg))
    if tokenizer_from:
        for f in ("tokenizer.model", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(tokenizer_from / f, path / f)
    return path


def test_other_architecture_is_one_clear_error(tmp_path):
    _text_checkpoint(tmp_path / "m", arch="LlamaForCausalLM")
    with pytest.raises(ExportError, match="LlamaForCausalLM.*only Gemma3ForConditionalGeneration") as e:
        open_checkpoint(tmp_path / "m")
    assert "\n" not in str(e.value)


def test_missing_shard_is_named(tmp_path):
    src = _text_checkpoint(tmp_path / "m")
    (src / "model.safetensors").rename(src / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors",
                            "model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ExportError, match="1 of 2 shards missing.*model-00002-of-00002"):
        open_checkpoint(src)


def test_missing_tokenizer_is_one_clear_error(tmp_path):
    from medgemma_edge.export.bundle import export_gguf

    src = _text_checkpoint(tmp_path / "m")
    with pytest.raises(ExportError, match="no tokenizer.model or tokenizer.json"):
        export_gguf(src, tmp_path / "out", "f32", quality=False)


def test_tokenizer_of_another_model_is_refused(tmp_path, tiny_dir):
    from medgemma_edge.export.bundle import export_gguf

    src = _text_checkpoint(tmp_path / "m", tokenizer_from=tiny_dir)
    with pytest.raises(ExportError, match="262144 pieces but the embedding only 512 rows"):
        export_gguf(src, tmp_path / "out", "f32", quality=False)


def test_config_that_does_not_fit_the_weights_is_refused(tmp_path, tiny_dir):
    from medgemma_edge.export.bundle import export_gguf

    src = _text_checkpoint(tmp_path / "m", tokenizer_from=tiny_dir)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="1 decoder layers, config.json says 2"):
        export_gguf(src, tmp_path / "out", "f32", quality=False)


def test_gemma2_style_soft_capping_is_refused(tmp_path, tiny_dir):
    from medgemma_edge.export.bundle import export_gguf

    src = _text_checkpoint(tmp_path / "m", tokenizer_from=tiny_dir)
    cfg = json.loads((src / "config.json").read_text())
    cfg["final_logit_softcapping"] = 30.0
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="soft-capping"):
        export_gguf(src, tmp_path / "out", "f32", quality=False)


def test_cli_export_error_is_one_line_exit_2(tmp_path):
    from medgemma_edge.cli import main

    res = CliRunner().invoke(main, ["export", str(tmp_path / "nope"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "not a folder" in lines[0], res.output


# -- manifest -----------------------------------------------------------------------------------

def _bundle(tmp_path):
    from medgemma_edge.runtime.manifest import file_entry, write_manifest

    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    manifest = {"format_version": 1, "backend": "gguf", "tool": "medgemma-edge test",
                "source": {"path_name": "x", "architecture": "Gemma3ForCausalLM", "config_sha256": "0"},
                "quantization": {"text": "f32", "vision": None}, "files": [file_entry(tmp_path, "text", "m.gguf")],
                "image": None, "chat_template": "", "special_tokens": {}, "context_length": 8,
                "vocab": {"tokenizer_entries": 1, "embedding_rows": 1, "padded": False}, "quality": None}
    write_manifest(tmp_path, manifest)
    return tmp_path


def test_manifest_round_trip_and_verify(tmp_path):
    from medgemma_edge.runtime.manifest import read_manifest, verify_bundle

    b = _bundle(tmp_path)
    assert read_manifest(b)["files"][0]["size"] == 1028
    assert verify_bundle(b)["quantization"]["text"] == "f32"


@pytest.mark.parametrize("damage,match", [
    (lambda b: (b / "manifest.json").unlink(), "no manifest.json"),
    (lambda b: (b / "manifest.json").write_text("{"), "not valid JSON"),
    (lambda b: _edit(b, format_version=2), "upgrade medgemma-edge"),
    (lambda b: _edit(b, files=[{"role": "text", "path": "../m.gguf", "size": 1, "sha256": "0" * 64}]), "inside the bundle"),
    (lambda b: (b / "m.gguf").unlink(), "m.gguf is missing"),
    (lambda b: (b / "m.gguf").write_bytes(b"GGUF"), "m.gguf has 4 bytes"),
])
def test_damaged_bundle_is_one_clear_error(tmp_path, damage, match):
    from medgemma_edge.runtime.manifest import verify_bundle

    b = _bundle(tmp_path)
    damage(b)
    with pytest.raises(BundleError, match=match) as e:
        verify_bundle(b)
    assert "\n" not in str(e.value)


def _edit(bundle, **changes):
    m = json.loads((bundle / "manifest.json").read_text())
    m.update(changes)
    (bundle / "manifest.json").write_text(json.dumps(m))


def test_output_folder_is_never_silently_reused(tmp_path):
    from medgemma_edge.export.bundle import prepare_out

    b = _bundle(tmp_path / "b")
    (b / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty.*--force"):
        prepare_out(b, overwrite=False)
    prepare_out(b, overwrite=True)
    assert sorted(p.name for p in b.iterdir()) == ["notes.txt"], "only the old bundle's own files go"
