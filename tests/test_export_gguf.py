"""`tiny` exported to GGUF bundles: parity with transformers at f32 (text logits and image
embeddings through mtmd), every quantization type loads and answers, the quality report, checkpoint
spellings / shards / bf16, and `verify` catching a flipped byte."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests import reference as ref
from tests.gguf_read import read_gguf

TEXT_COS_MIN = 0.9999
# f32 mmproj fed our 896² view against transformers in f32: only summation order differs
# (measured ~0.999999); a resize by mtmd that was not the identity would land near 0.99 or below.
IMAGE_COS_MIN = 0.99999

CHATS = {
    "short": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
    "medical": [{"role": "user", "content": [{"type": "text", "text": "What does a pleural effusion look like?"}]}],
    # longer than tiny's sliding window, so local and global layers differ
    "long": [{"role": "system", "content": [{"type": "text", "text": "You are a helpful medical assistant."}]},
             {"role": "user", "content": [{"type": "text", "text":
              (Path(__file__).parent / "data" / "medical_text.txt").read_text() +
              " A 67-year-old smoker has had a productive cough, fever and right-sided chest pain "
              "for four days. Which investigations come first, and why?"}]}],
}
N_CTX = 1024


def _llama(path):
    from llama_cpp import Llama

    return Llama(str(path), n_ctx=N_CTX, n_batch=512, n_ubatch=512, n_threads=2, verbose=False)


def _next_logits(llm, ids):
    """Logits after the last of `ids`, evaluated from an empty cache."""
    import llama_cpp

    llm.reset()
    llm.eval(ids)
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()


def _pixels(seed=7, size=896):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(9 * x + 3 * y), np.cos(7 * y - 2 * x), np.sin(5 * (x + y))], -1)
    return (127.5 + 100 * base + rng.normal(0, 12, (size, size, 3))).clip(0, 255).astype(np.uint8)


# -- parity at f32 ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_f32_llm(tiny_bundle_f32):
    _, files = ref.manifest_files(tiny_bundle_f32)
    return _llama(files["text"])


@pytest.mark.parametrize("name", sorted(CHATS))
def test_f32_text_logits_match_transformers(tiny_f32_llm, tiny_dir, name):
    msgs = CHATS[name]
    hf_ids = ref.encode_chat(tiny_dir, msgs)["input_ids"][0].tolist()
    if name == "long":  # the point of this case: local (windowed) and global layers must differ
        window = json.loads((tiny_dir / "config.json").read_text())["text_config"]["sliding_window"]
        assert len(hf_ids) > window + 8, f"the long prompt has {len(hf_ids)} tokens, tiny's window is {window}"
    ours_ids = tiny_f32_llm.tokenize(ref.render_chat(tiny_dir, msgs).encode(), add_bos=False, special=True)
    assert ours_ids == hf_ids, f"{name}: the GGUF tokenizer differs from transformers'"
    theirs = ref.next_token_logits(tiny_dir, msgs)
    ours = _next_logits(tiny_f32_llm, hf_ids)
    cos = ref.cosine(ours, theirs)
    print(f"{name} ({len(hf_ids)} tokens): cosine {cos:.7f}, worst |d| {np.abs(ours - theirs).max():.2e}, "
          f"top-1 {ours.argmax()} vs {theirs.argmax()}")
    assert ours.argmax() == theirs.argmax(), f"{name}: top-1 differs"
    assert cos >= TEXT_COS_MIN


def test_f32_image_embeddings_match_transformers(tiny_f32_llm, tiny_bundle_f32, tiny_dir):
    from medgemma_edge.runtime.backends.mtmd import VisionEncoder

    _, files = ref.manifest_files(tiny_bundle_f32)
    pixels = _pixels()
    enc = VisionEncoder(str(files["vision"]), tiny_f32_llm.model, 2)
    try:
        ours = enc.encode(pixels)
    finally:
        enc.close()
    normalized = ((pixels.astype(np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1)[None]
    theirs = ref.image_features(tiny_dir, normalized)[0]
    cos = ref.cosine(ours, theirs)
    print(f"image embeddings {ours.shape}: cosine {cos:.7f}, worst |d| {np.abs(ours - theirs).max():.2e}")
    assert ours.shape == theirs.shape == (256, 256)
    assert cos >= IMAGE_COS_MIN


def test_f32_bundle_manifest(tiny_bundle_f32, tiny_dir):
    from medgemma_edge.runtime.manifest import verify_bundle

    m = verify_bundle(tiny_bundle_f32)
    assert m["quantization"] == {"text": "f32", "vision": "f32"} and m["quality"] is None
    assert m["image"] == {"size": 896, "patch_size": 14, "tokens_per_image": 256, "mean": [0.5] * 3, "std": [0.5] * 3}
    assert m["vocab"] == {"tokenizer_entries": 262145, "embedding_rows": 262208, "padded": True}
    assert m["source"]["architecture"] == "Gemma3ForConditionalGeneration" and m["source"]["path_name"] == "tiny"
    assert m["chat_template"] == (tiny_dir / "chat_template.jinja").read_text()
    kv, tensors = read_gguf(tiny_bundle_f32 / m["files"][0]["path"])
    assert kv["tokenizer.chat_template"] == m["chat_template"]
    assert len(kv["tokenizer.ggml.tokens"]) == 262208 and kv["tokenizer.ggml.tokens"][-1] == "<unused6304>"
    assert kv["gemma3.attention.sliding_window_pattern"] == [True, True, False, True, True, False]
    assert "output.weight" not in tensors, "the output head is tied"


# -- every quantization type --------------------------------------------------------------------

# text quant → vision quant exported with it (every vision type appears at least once)
MATRIX = {"f16": "f16", "bf16": "f32", "q8_0": "q8_0", "q6_k": "f16", "q5_k_m": "q8_0", "q4_k_m": "q8_0"}
QUALITY_FOR = "q4_k_m"  # the one export of the matrix that also measures the quality report
KEEP_FOR = "q6_k"  # the one that keeps its intermediate GGUF
# the quantized model's next-token logits against the f32 export (tiny's random weights give flat
# distributions, so top-1 is not asked of the K-quants)
COS_VS_F32 = {"f16": 0.9999, "bf16": 0.999, "q8_0": 0.999, "q6_k": 0.99, "q5_k_m": 0.98, "q4_k_m": 0.95}
# the vision file's image embeddings against the f32 mmproj on the same picture. f16 and q8_0
# weights keep ~3 and ~2.5 significant digits per weight; these bounds sit an order of magnitude
# under 1 - cosine measured on both AVX2 and AVX-512 machines, and far above what a wrong tensor
# (cosine ~0 to 0.9) gives.
VISION_COS_VS_F32 = {"f32": 0.99999, "f16": 0.9999, "q8_0": 0.999}


@pytest.fixture(scope="module")
def quant_bundles(tmp_path_factory, tiny_dir):
    from medgemma_edge.export.bundle import export_gguf

    root = tmp_path_factory.mktemp("tiny-quants")
    built = {}

    def get(quant):
        if quant not in built:
            built[quant] = export_gguf(tiny_dir, root / quant, quant, MATRIX[quant], quality=quant == QUALITY_FOR,
                                       keep_intermediate=quant == KEEP_FOR, threads=2)
        return built[quant]

    return get


@pytest.mark.parametrize("quant", list(MATRIX))
def test_each_quant_loads_and_answers(quant_bundles, tiny_f32_llm, tiny_bundle_f32, tiny_dir, quant):
    from medgemma_edge.runtime.manifest import verify_bundle

    res = quant_bundles(quant)
    m, files = ref.manifest_files(res.bundle)
    verify_bundle(res.bundle)
    assert m["quantization"] == {"text": quant, "vision": MATRIX[quant]}
    kept = sorted(p.name for p in (res.bundle / "intermediate").glob("*")) if quant == KEEP_FOR else []
    assert kept == (["tiny-f32.gguf"] if quant == KEEP_FOR else []), kept
    assert (res.bundle / "intermediate").exists() == (quant == KEEP_FOR), "intermediates go unless kept"
    types = {name: t[0] for name, t in read_gguf(files["text"])[1].items()}
    print(f"{quant}: {len(types)} tensors, types {sorted(set(types.values()))}, "
          f"{files['text'].stat().st_size / 1e6:.1f} MB, {res.seconds:.1f} s")
    assert types["blk.0.attn_norm.weight"] == "F32"
    llm = _llama(files["text"])
    ids = llm.tokenize(b"<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n", add_bos=True, special=True)
    ours = _next_logits(llm, ids)
    base = _next_logits(tiny_f32_llm, ids)
    cos = ref.cosine(ours, base)
    print(f"{quant}: next-token cosine vs f32 export {cos:.5f}")
    assert np.isfinite(ours).all() and cos >= COS_VS_F32[quant]

    vtypes = {name: t[0] for name, t in read_gguf(files["vision"])[1].items()}
    assert vtypes["v.patch_embd.weight"] == "F32" and vtypes["v.position_embd.weight"] == "F32"
    assert vtypes["mm.input_projection.weight"] in ("F32", "F16")
    emb = _encode(files["vision"], llm, _pixels(3))
    emb32 = _encode(ref.manifest_files(tiny_bundle_f32)[1]["vision"], tiny_f32_llm, _pixels(3))
    vcos = ref.cosine(emb, emb32)
    print(f"{quant}: vision {MATRIX[quant]} embeddings vs f32 mmproj: cosine {vcos:.6f}, "
          f"worst |d| {np.abs(emb - emb32).max():.2e}")
    assert emb.shape == (256, 256) and vcos >= VISION_COS_VS_F32[MATRIX[quant]]

    # ... and the product answers through it: the runtime's logits are llama.cpp's on the same prompt.
    # Not bit-equal: `Llama` lets llama.cpp repack quantized weights for this CPU's kernels (the
    # runtime does not, to save memory), and the two layouts sum in different orders.
    import medgemma_edge

    # the plain path: speculative decoding (auto on some CPUs) runs flash attention, which moves the
    # logits by itself (runtime/spec_choice.py; benchmarks/results/KV_CACHE.md measures how much)
    model = medgemma_edge.load(res.bundle, threads=2, context=N_CTX, speculative="off")
    msgs = [{"role": "user", "content": "Hi"}]
    runtime_logits = model.next_token_logits(msgs)
    same = _next_logits(llm, model.engine.tokenize(ref.render_chat(tiny_dir, msgs)))
    rcos = ref.cosine(runtime_logits, same)
    print(f"{quant}: runtime vs llama.cpp direct: cosine {rcos:.7f}, worst |d| {np.abs(runtime_logits - same).max():.2e}")
    assert rcos >= 0.9999
    reply = model.chat(msgs, max_new_tokens=4)
    assert reply.completion_tokens == 4 or reply.finish_reason == "stop"


def _encode(mmproj, llm, pixels):
    from medgemma_edge.runtime.backends.mtmd import VisionEncoder

    enc = VisionEncoder(str(mmproj), llm.model, 2)
    try:
        return enc.encode(pixels)
    finally:
        enc.close()


def test_quality_report_is_in_the_manifest(quant_bundles):
    from medgemma_edge.export.quality import load_prompts

    m = quant_bundles(QUALITY_FOR).manifest
    q = m["quality"]
    print(json.dumps(q, indent=1))
    t, v = q["text"], q["vision"]
    assert t["quant"] == QUALITY_FOR and t["reference"] == "f32" and t["prompts"] == len(load_prompts())
    assert t["positions"] >= 300 and 0 <= t["mean_kl"] <= t["max_kl"] < 1 and 0 < t["top1_agreement"] <= 1
    assert v["quant"] == "q8_0" and v["reference"] == "f32" and 0.99 < v["min_cosine"] <= v["mean_cosine"] <= 1


# -- checkpoint spellings, shards, bf16 ---------------------------------------------------------

RESPELL = (("language_model.model.", "model.language_model."),
           ("vision_tower.", "model.vision_tower."),
           ("multi_modal_projector.", "model.multi_modal_projector."))


@pytest.fixture(scope="module")
def respelled_bf16(tmp_path_factory, tiny_dir):
    """tiny in transformers' newer spelling, bf16, in two shards with an index."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("respelled") / "tiny-bf16-sharded"
    out.mkdir()
    tensors = {}
    with safe_open(str(tiny_dir / "model.safetensors"), "pt") as f:
        for k in f.keys():
            name = next((new + k[len(old):] for old, new in RESPELL if k.startswith(old)), k)
            tensors[name] = f.get_tensor(k).to(torch.bfloat16)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(out / shard), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    for f in tiny_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != ".stamp":
            shutil.copy(f, out / f.name)
    return out, tensors


def test_respelled_sharded_bf16_checkpoint_exports_exactly(tmp_path, respelled_bf16):
    """Every GGUF tensor equals its bf16 source widened to f32 (+1 on Gemma norms only)."""
    import torch

    from medgemma_edge.export.bundle import export_gguf
    from medgemma_edge.export.gguf_tensors import GEMMA_NORM, map_name
    from medgemma_edge.export.checkpoint import _canonical

    src, tensors = respelled_bf16
    res = export_gguf(src, tmp_path / "b", "f32", "f32", quality=False)
    assert res.manifest["quantization"] == {"text": "f32", "vision": "f32"}
    written = {}
    for path in ref.manifest_files(res.bundle)[1].values():
        written |= {name: t[2] for name, t in read_gguf(path)[1].items()}
    worst, plus_one = 0.0, 0
    for stored, tensor in tensors.items():
        part, name = _canonical(stored, "Gemma3ForConditionalGeneration")
        mapped = map_name(part, name)
        want = tensor.to(torch.float32).numpy() + (1.0 if mapped.kind == GEMMA_NORM else 0.0)
        plus_one += mapped.kind == GEMMA_NORM
        got = written.pop(mapped.gguf_name)
        worst = max(worst, float(np.abs(got.reshape(want.shape) - want).max()))
    print(f"{len(tensors)} tensors, {plus_one} with +1, worst |d| {worst:.1e}, unmatched {sorted(written)}")
    assert worst == 0.0 and not written
    assert plus_one == 6 * 6 + 1 + 1  # 6 norms per decoder layer, the final norm, the soft-embedding norm


def test_bf16_source_is_the_quality_reference(respelled_bf16):
    from medgemma_edge.export.bundle import reference_type
    from medgemma_edge.export.checkpoint import open_checkpoint

    assert reference_type(open_checkpoint(respelled_bf16[0])) == "bf16"


# -- verify ---------------------------------------------------------------------------------------

def test_verify_catches_a_flipped_byte(quant_bundles, tmp_path):
    ref.assert_verify_names_the_damage(quant_bundles("q4_k_m").bundle, "text", tmp_path)
