"""Real Gemma 3 270M weights through the GGUF export: greedy parity at f32 with transformers, and
the quantization report at q8_0 / q4_k_m (run through the CLI in a subprocess, which also gives
the export's time and peak memory)."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from tests import reference as ref

PROMPTS = [
    "What is the normal range of adult resting heart rate?",
    "Name three common causes of chest pain.",
    "Explain what an X-ray is in one sentence.",
    "What does the liver do?",
    "Write a short note reminding a patient to take their medicine.",
]
N_TOKENS = 32
# llama.cpp's own Q8_0 of this model scores 97.4% on the shipped prompts (its Q8_0 matmuls also
# round activations to 8 bits); the bundle's file is byte-identical to it (test below), so the
# bar is set just under what llama.cpp itself reaches: a regression in our export would fall below.
Q8_TOP1_MIN = 0.97


def _chat(text):
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


@pytest.mark.parametrize("i", range(len(PROMPTS)))
def test_f32_greedy_32_tokens_match_transformers(gemma270m_bundle_f32, gemma270m_dir, i):
    from llama_cpp import Llama

    m = json.loads((gemma270m_bundle_f32 / "manifest.json").read_text())
    llm = Llama(str(gemma270m_bundle_f32 / m["files"][0]["path"]), n_ctx=128, n_batch=128, n_ubatch=128,
                logits_all=True, n_threads=2, verbose=False)
    msgs = _chat(PROMPTS[i])
    prompt = ref.encode_chat(gemma270m_dir, msgs)["input_ids"][0].tolist()
    assert llm.tokenize(ref.render_chat(gemma270m_dir, msgs).encode(), add_bos=False, special=True) == prompt
    theirs, their_logits = ref.greedy_generate(gemma270m_dir, msgs, N_TOKENS)
    llm.eval(prompt)
    ours = []
    for step, want in enumerate(theirs):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        ours.append(tok)
        if tok != want:
            tie, gap = ref.near_tie(their_logits[step])
            print(f"prompt {i}: step {step} ours {tok} vs transformers {want}, their top-2 gap {gap:.2e}")
            assert tie, f"prompt {i}: greedy diverges at step {step} without a near-tie (gap {gap:.2e})"
            break
        llm.eval([tok])
    print(f"prompt {i}: {len(ours)} of {len(theirs)} tokens equal: {llm.detokenize(ours)!r}")
    assert len(ours) >= 8 or ours[-1] != theirs[len(ours) - 1]


def _cli_export(src, out, quant) -> dict:
    """Run `medgemma-edge export` in a fresh process: manifest, seconds, {stage: peak MB}, bundle."""
    cmd = [sys.executable, "-c", "from runtime.cli import main; main()", "export", str(src), "-o", str(out),
           "--quant", quant, "--threads", "2"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    print(run.stdout)
    peaks = {stage: float(mb.replace(",", "")) for mb, stage in
             re.findall(r"([\d,]+) MB (writing|after llama.cpp's quantizer|after the quality check)", run.stdout)}
    return {"manifest": json.loads((out / "manifest.json").read_text()), "bundle": out, "peaks": peaks,
            "seconds": float(re.search(r"took ([\d.]+) s", run.stdout).group(1))}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, gemma270m_dir):
    root = tmp_path_factory.mktemp("g270m")
    return {q: _cli_export(gemma270m_dir, root / q, q) for q in ("q8_0", "q4_k_m")}


def _report(e, quant):
    t = e["manifest"]["quality"]["text"]
    print(f"{quant}: top-1 {100 * t['top1_agreement']:.2f}% over {t['positions']} positions, mean KL "
          f"{t['mean_kl']:.5f} (max {t['max_kl']:.3f}); export {e['seconds']:.1f} s, peak MB {e['peaks']}")
    return t


def test_q8_0_agrees_with_the_f32_export(exported):
    e = exported["q8_0"]
    t = _report(e, "q8_0")
    assert t["reference"] == "f32" and t["positions"] >= 300
    assert t["top1_agreement"] >= Q8_TOP1_MIN
    assert e["manifest"]["quality"].get("vision") is None and e["manifest"]["image"] is None


def test_q8_0_is_byte_identical_to_llama_cpp_quantizer(exported, gemma270m_bundle_f32, tmp_path):
    """gguf-py writes Q8_0 itself; llama.cpp's quantizer on the f32 export must give the same bytes."""
    import ctypes

    import llama_cpp

    from tests.gguf_read import read_gguf

    e = exported["q8_0"]
    ours = read_gguf(e["bundle"] / e["manifest"]["files"][0]["path"])[1]
    f32 = gemma270m_bundle_f32 / json.loads((gemma270m_bundle_f32 / "manifest.json").read_text())["files"][0]["path"]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, 2
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(tmp_path / "q8.gguf").encode(),
                                          ctypes.byref(params)) == 0
    theirs = read_gguf(tmp_path / "q8.gguf")[1]
    differ = [n for n in theirs if ours[n][0] != theirs[n][0]
              or not np.array_equal(np.asarray(ours[n][2]).view(np.uint8), np.asarray(theirs[n][2]).view(np.uint8))]
    print(f"{len(theirs)} tensors, {len(differ)} differ: {differ[:5]}")
    assert set(ours) == set(theirs) and not differ


def test_q4_k_m_is_reported(exported):
    t = _report(exported["q4_k_m"], "q4_k_m")
    assert 0 < t["mean_kl"] < 1 and t["top1_agreement"] > 0.5


def test_conversion_streams(exported, gemma270m_dir):
    """Peak memory while writing GGUFs stays well below the checkpoint's size (one slice of rows
    plus the interpreter, torch and the tokenizer); llama.cpp's quantizer adds about one tensor
    in f32 and its quantized copy (here the 640 MiB embedding)."""
    size_mb = (gemma270m_dir / "model.safetensors").stat().st_size / 2**20
    largest_f32_mb = 262144 * 640 * 4 / 2**20
    for quant, e in exported.items():
        print(f"{quant}: peak MB {e['peaks']} converting a {size_mb:.0f} MB checkpoint in {e['seconds']:.1f} s")
        assert e["peaks"]["writing"] < 0.6 * size_mb
        if "after llama.cpp's quantizer" in e["peaks"]:
            assert e["peaks"]["after llama.cpp's quantizer"] < e["peaks"]["writing"] + 1.5 * largest_f32_mb


def test_q8_0_top1_on_real_text_is_at_least_98_percent(exported, gemma270m_bundle_f32):
    """The issue's bar: ≥ 98 % top-1 agreement with the f32 export over a few hundred teacher-forced
    positions of real text (the same paragraph the foundation test uses). The quality report's chat
    exchanges, short answers after a question, score lower (97.4 %; see test_q8_0_agrees_with_the_f32_export)."""
    from pathlib import Path

    from llama_cpp import Llama

    text = (Path(__file__).parent / "data" / "medical_text.txt").read_text()

    def scores(bundle):
        m = json.loads((bundle / "manifest.json").read_text())
        llm = Llama(str(bundle / m["files"][0]["path"]), n_ctx=1024, logits_all=True, n_threads=2, verbose=False)
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])

    ref32, q8 = scores(gemma270m_bundle_f32), scores(exported["q8_0"]["bundle"])
    agree = (ref32.argmax(-1) == q8.argmax(-1)).mean()
    print(f"q8_0 vs f32 on real text: top-1 {100 * agree:.2f}% over {len(ref32)} positions")
    assert len(ref32) >= 250
    assert agree >= 0.98, f"q8_0 top-1 agreement {agree:.4f} < 0.98"
