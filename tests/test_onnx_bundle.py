"""`export --format onnx`: tiny as an ONNX bundle (decoder, embedding table, tokenizer.gguf, ONNX
vision), loaded through the same `medgemma_edge.load` and compared with transformers.

Bounds: fp32 is the same float arithmetic as transformers in another order (cosine ≥ 0.9999 and the
same top-1, as every f32 bundle test; tests/test_runtime.py COS_MIN). int8 / int4 against the fp32
bundle on tiny's random weights (flat distributions): cosine bounds only, as for the GGUF K-quants.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tests import reference as ref
from tests.test_export_gguf import CHATS, _pixels
from tests.test_runtime import _assert_same_greedy, _compare, _greedy_ids, _image_chat

# tiny's random weights: next-token logits of the quantized decoders against the fp32 bundle
COS_VS_FP32 = {"int8": 0.999, "int4": 0.95}  # measured: int4 0.9637 (the GGUF q4_k_m bound)
VISION_INT8_COS_MIN = 0.999  # tests/test_export_onnx_vision.py


@pytest.fixture(scope="module")
def fp32_model(onnx_bundles):
    import medgemma_edge

    return medgemma_edge.load(onnx_bundles("fp32").bundle, device="cpu", threads=2, context=1024, fit="stretch")


def test_manifest_lists_every_file_with_its_role(onnx_bundles):
    from medgemma_edge.runtime.manifest import verify_bundle

    res = onnx_bundles("fp32")
    m = verify_bundle(res.bundle)
    roles = [(f["role"], f["path"]) for f in m["files"]]
    print(roles)
    assert m["backend"] == "onnx" and m["quantization"] == {"text": "fp32", "vision": "onnx-f32"}
    assert roles[0] == ("text", "decoder.onnx") and ("text_data", "decoder.onnx.data") in roles
    assert ("tokenizer", "tokenizer.gguf") in roles and any(r == "embeddings" for r, _ in roles)
    assert [p for r, p in roles if r == "vision"] == ["tiny-vision-f32.onnx"]
    d = m["decoder"]
    assert d["layers"] == 6 and d["kv_heads"] == 2 and d["head_dim"] == 64 and d["hidden"] == 256
    assert d["sliding_window"] == 320 and d["quant"] == "fp32"
    assert m["selfcheck"]["path"] == "selfcheck.json"  # the self-check's probe, hashed by verify too
    assert sorted(p.name for p in res.bundle.iterdir()) == sorted([p for _, p in roles] + ["manifest.json",
                                                                                       "selfcheck.json"]), \
        "the bundle holds its listed files and nothing else (no intermediate folder)"


def test_fp32_image_chat_logits_match_transformers(fp32_model, tiny_dir):
    msgs = _image_chat(Image.fromarray(_pixels(seed=8, size=640)))
    _compare(fp32_model.next_token_logits(msgs), ref.next_token_logits(tiny_dir, msgs), "ONNX fp32 bundle, image chat")
    assert type(fp32_model._vision).__name__ == "OnnxVisionEncoder"
    assert type(fp32_model.engine).__name__ == "OnnxTextEngine"


def test_fp32_long_text_logits_match_transformers(fp32_model, tiny_dir):
    """Longer than tiny's sliding window (320): local and global layers must differ."""
    msgs = CHATS["long"]
    _compare(fp32_model.next_token_logits(msgs), ref.next_token_logits(tiny_dir, msgs), "ONNX fp32 bundle, long text")


def test_fp32_greedy_chat_reuses_the_image_and_matches_transformers(fp32_model, tiny_dir):
    msgs = _image_chat(Image.fromarray(_pixels(seed=5, size=500)), "Describe the findings.")
    want, logits = ref.greedy_generate(tiny_dir, msgs, 8)
    _assert_same_greedy(fp32_model, *_greedy_ids(fp32_model, msgs, 8), want, logits)
    first = fp32_model.chat(msgs, max_new_tokens=8)
    streamed = "".join(r.text for r in fp32_model.stream(msgs, max_new_tokens=8))
    again = fp32_model.chat(msgs, max_new_tokens=8)
    print(f"first {first.stats.as_dict()}\nagain {again.stats.as_dict()}")
    assert streamed == again.text == first.text
    assert again.stats.images_from_cache >= 1, "the second ask must take the image from the cache"
    assert again.stats.reused_tokens >= 256, "the second ask must reuse the evaluated image prefix"


def test_int8_quality_report_and_answer(onnx_bundles):
    from medgemma_edge.export.quality import load_prompts

    res = onnx_bundles("int8")
    q = res.manifest["quality"]
    print(json.dumps(q, indent=1))
    t, v = q["text"], q["vision"]
    assert t["quant"] == "int8" and t["reference"] == "fp32" and t["prompts"] == len(load_prompts())
    assert t["positions"] >= 300 and 0 <= t["mean_kl"] <= t["max_kl"] < 1 and 0.5 < t["top1_agreement"] <= 1
    assert v["quant"] == "onnx-int8" and v["reference"] == "onnx-f32" and v["min_cosine"] >= VISION_INT8_COS_MIN
    vision = next(f for f in res.manifest["files"] if f["role"] == "vision")
    assert vision["fidelity"] == v["min_cosine"]
    _close_to_fp32(onnx_bundles, "int8")


def test_int4_loads_and_answers(onnx_bundles):
    _close_to_fp32(onnx_bundles, "int4")


def _close_to_fp32(onnx_bundles, quant):
    import medgemma_edge

    msgs = _image_chat(Image.fromarray(_pixels(seed=2, size=400)), "Anything abnormal?")
    model = medgemma_edge.load(onnx_bundles(quant).bundle, device="cpu", threads=2, context=1024)
    base = medgemma_edge.load(onnx_bundles("fp32").bundle, device="cpu", threads=2, context=1024)
    ours, theirs = model.next_token_logits(msgs), base.next_token_logits(msgs)
    cos = ref.cosine(ours, theirs)
    print(f"{quant} vs fp32 bundle: cosine {cos:.6f}, worst |d| {np.abs(ours - theirs).max():.2e}")
    assert np.isfinite(ours).all() and cos >= COS_VS_FP32[quant]
    reply = model.chat(msgs, max_new_tokens=4)
    assert reply.completion_tokens == 4 or reply.finish_reason == "stop"


def test_verify_hashes_the_external_weights(onnx_bundles, tmp_path):
    line = ref.assert_verify_names_the_damage(onnx_bundles("fp32").bundle, "text_data", tmp_path)
    assert "decoder.onnx.data" in line


def test_ask_offline_without_torch(onnx_bundles, tmp_path):
    """The CLI answers about an image from an ONNX bundle, in a process that never imports torch or
    transformers and has no network (HF_HUB_OFFLINE; onnxruntime and llama.cpp open no sockets)."""
    png = tmp_path / "xray.png"
    Image.fromarray(_pixels(seed=4, size=300)).save(png)
    code = ("import sys; from medgemma_edge.cli import main; sys.argv = ['medgemma-edge'] + sys.argv[1:]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
            "print('IMPORTED', bad, file=sys.stderr); sys.exit(code if not bad else 3)")
    run = subprocess.run([sys.executable, "-c", code, "ask", "-m", str(onnx_bundles("fp32").bundle), "--image",
                          str(png), "--max-tokens", "6", "--threads", "2", "--device", "cpu",
                          "What does this image show?"], capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)})
    print(run.stdout, run.stderr[-1500:])
    assert run.returncode == 0, run.stderr[-1500:]
    assert run.stdout.strip(), "no answer printed"
    assert "IMPORTED []" in run.stderr


def test_device_cuda_without_the_cuda_provider_is_one_line(onnx_bundles, monkeypatch):
    import onnxruntime

    import medgemma_edge
    from medgemma_edge.runtime.errors import InputError

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(InputError, match=r"pip uninstall -y onnxruntime && pip install onnxruntime-gpu\), or use"):
        medgemma_edge.load(onnx_bundles("fp32").bundle, device="cuda", threads=1, context=512)


@pytest.mark.parametrize("args,words", [
    (["--format", "onnx", "--quant", "q4_k_m"], ["q4_k_m", "fp32, int8, int4"]),
    (["--format", "gguf", "--quant", "int4"], ["int4", "gguf", "q4_k_m"]),
    (["--format", "onnx", "--vision-quant", "f16"], ["f16", "onnx-f32"]),
])
def test_wrong_format_quant_combination_is_one_line(tiny_dir, tmp_path, args, words):
    from medgemma_edge.cli import main

    res = CliRunner().invoke(main, ["export", str(tiny_dir), "-o", str(tmp_path / "out"), *args])
    print(res.output)
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert all(w in lines[0] for w in words)
    assert not (tmp_path / "out").exists(), "nothing is written for a refused combination"


def test_manifest_rules_for_onnx_bundles(onnx_bundles, tmp_path):
    from medgemma_edge.runtime.errors import BundleError
    from medgemma_edge.runtime.manifest import read_manifest

    m, _ = ref.manifest_files(onnx_bundles("fp32").bundle)

    def check(manifest, match):
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(BundleError, match=match):
            read_manifest(tmp_path)

    check({k: v for k, v in m.items() if k != "decoder"}, "without its decoder description")
    check({k: v for k, v in m.items() if k != "embeddings"}, "without its decoder description")
    check({**m, "decoder": {**m["decoder"], "layers": "six"}}, "malformed decoder field")
    check({**m, "files": [f for f in m["files"] if f["role"] != "tokenizer"]}, "must list one tokenizer file")
    check({**m, "backend": "gguf"}, "only text/vision files")
