"""--vision-quant onnx-f32 / onnx-int8: the vision tower through onnxruntime, against transformers."""

import json

import numpy as np
import pytest

from tests import reference as ref
from tests.test_export_gguf import _pixels

F32_COS_MIN = 0.999999  # the same float graph as transformers'
INT8_COS_MIN = 0.999  # u8 or s8 weights per channel, dynamic u8 activations: vision_choice.FIDELITY_MIN


@pytest.fixture(scope="module")
def onnx_bundles(tmp_path_factory, tiny_dir):
    from medgemma_edge.export.bundle import export_gguf

    root = tmp_path_factory.mktemp("onnx-bundles")
    out = {}
    for vq in ("onnx-f32", "onnx-int8", "onnx-int8-vnni", "onnx-int8-vnni-attn"):
        out[vq] = root / vq
        export_gguf(tiny_dir, out[vq], quant="f32", vision_quant=vq, quality=(vq == "onnx-int8"))
    return out


def _encoder(bundle):
    from medgemma_edge.runtime.backends.onnx_vision import OnnxVisionEncoder

    manifest = json.loads((bundle / "manifest.json").read_text())
    path = bundle / next(f["path"] for f in manifest["files"] if f["role"] == "vision")
    assert path.suffix == ".onnx"
    return OnnxVisionEncoder(str(path), n_embd=256, threads=2, mean=manifest["image"]["mean"],
                             std=manifest["image"]["std"])


def _has_vnni() -> bool:
    from medgemma_edge.runtime.vision_choice import cpu_flags, cpu_kind

    return cpu_kind(cpu_flags()) == "vnni"


@pytest.mark.parametrize("vq,cos_min", [("onnx-f32", F32_COS_MIN), ("onnx-int8", INT8_COS_MIN),
                                        ("onnx-int8-vnni", INT8_COS_MIN), ("onnx-int8-vnni-attn", INT8_COS_MIN)])
def test_onnx_image_embeddings_match_transformers(onnx_bundles, tiny_dir, vq, cos_min):
    if vq.startswith("onnx-int8-vnni") and not _has_vnni():
        # full 8-bit weights overflow AVX2's int16 pair sums (cosine ~0.98): the runtime never runs
        # this file on such a CPU (tests/test_vision_choice.py), so there is no bound to hold here
        pytest.skip("full 8-bit int8 weights are for CPUs with VNNI; this one has none")
    pixels = _pixels(seed=3)
    ours = _encoder(onnx_bundles[vq]).encode(pixels)
    normalized = ((pixels.astype(np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1)[None]
    theirs = ref.image_features(tiny_dir, normalized)[0]
    cos = ref.cosine(ours, theirs)
    print(f"{vq} image embeddings {ours.shape}: cosine {cos:.7f}, worst |d| {np.abs(ours - theirs).max():.2e}")
    assert ours.shape == theirs.shape == (256, 256)
    assert cos >= cos_min, f"{vq}: cosine {cos:.7f} < {cos_min}"


def test_mlp_activation_is_one_fast_gelu_node(onnx_bundles):
    """The traced tower's GELU is onnxruntime's FastGelu (one node per layer), not opset 17's nine
    elementwise nodes; the image embeddings test above holds it to transformers' own GELU."""
    import onnx

    for vq in ("onnx-f32", "onnx-int8"):
        bundle = onnx_bundles[vq]
        manifest = json.loads((bundle / "manifest.json").read_text())
        path = bundle / next(f["path"] for f in manifest["files"] if f["role"] == "vision")
        ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
        assert ops.count("FastGelu") == 2 and "Tanh" not in ops, f"{vq}: {sorted(set(ops))}"


def test_int8_attention_file_matches_the_f32_file(onnx_bundles):
    """onnx-int8-vnni-attn against onnx-f32 on the same pixels (tiny: 4096 tokens, 16 query chunks),
    and against onnx-int8-vnni: the attention's own share of the difference."""
    if not _has_vnni():
        pytest.skip("int8 attention products are for CPUs with VNNI; this one has none")
    pixels = _pixels(seed=5)
    f32, vnni, attn = (_encoder(onnx_bundles[vq]).encode(pixels)
                       for vq in ("onnx-f32", "onnx-int8-vnni", "onnx-int8-vnni-attn"))
    cos, cos_vnni = ref.cosine(attn, f32), ref.cosine(attn, vnni)
    worst = np.abs(attn - f32).max() / np.abs(f32).max()
    msg = f"int8 attention vs f32: cosine {cos:.7f} (vs int8-vnni {cos_vnni:.7f}), worst relative |d| {worst:.2e}"
    print(msg)
    assert cos >= INT8_COS_MIN and cos_vnni >= INT8_COS_MIN, msg


def test_onnx_bundle_chat_logits_match_transformers(onnx_bundles, tiny_dir):
    import medgemma_edge
    from PIL import Image

    from tests.test_runtime import _compare, _image_chat

    model = medgemma_edge.load(onnx_bundles["onnx-f32"], threads=2, context=1024, fit="stretch")
    msgs = _image_chat(Image.fromarray(_pixels(seed=8, size=640)))
    _compare(model.next_token_logits(msgs), ref.next_token_logits(tiny_dir, msgs), "onnx-f32 bundle, image chat")
    assert type(model._vision).__name__ == "OnnxVisionEncoder"


def test_int8_manifest_records_fidelity_and_verifies(onnx_bundles):
    from medgemma_edge.runtime.manifest import verify_bundle

    m = verify_bundle(onnx_bundles["onnx-int8"])
    assert m["quantization"]["vision"] == "onnx-int8"
    q = m["quality"]["vision"]
    print(f"quality report: {q}")
    assert q["reference"] == "f32" and q["min_cosine"] >= INT8_COS_MIN, q
    vision = next(f for f in m["files"] if f["role"] == "vision")
    assert vision["path"].endswith("-vision-int8.onnx")


def test_wrong_width_vision_file_is_one_clear_error(onnx_bundles):
    from medgemma_edge.runtime.backends.onnx_vision import OnnxVisionEncoder
    from medgemma_edge.runtime.errors import BundleError

    path = next(onnx_bundles["onnx-f32"].glob("*.onnx"))
    with pytest.raises(BundleError, match="does not belong to this model"):
        OnnxVisionEncoder(str(path), n_embd=640)
