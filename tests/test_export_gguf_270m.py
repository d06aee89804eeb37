"""Real Gemma 3 270M weights through the GGUF export: greedy parity at f32 with transformers, and
the quantization report at q8_0 / q4_k_m (each export in a fresh process, which also gives its
time and peak memory).

Quality bounds and the CPU. llama.cpp's quantized matmuls round activations to 8 bits and run
per-CPU kernels (AVX2 and AVX-512 sum in different orders), so which *near ties* flip differs from
machine to machine: q8_0's plain top-1 agreement with f32 measured 97.4 % (chat prompts) on an
AVX2 EPYC and 96.9 % (real text) on an AVX-512 one. Those digits are not a property of the export.
What is: (1) our Q8_0 file is byte-identical to llama.cpp's own quantizer on the same weights
(strict, any CPU); (2) at *decisive* positions, where the f32 export's top-1 leads its runner-up
by ≥ 1 nat (export/quality.py DECISIVE_GAP), quantization must not change the answer — every flip
measured on either machine sat at a gap under 0.35 nat, so the rule holds by a margin of ~3× on
any kernel, while a broken tensor flips many decisive positions; (3) mean KL, an average over
hundreds of positions that kernel order moves by far less than 1 %, stays under a bound ~2.5×
above the measured value (q8_0: 0.0044 chat / 0.0033 text; q4_k_m 0.0077 chat)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from medgemma_edge.export.quants import K_QUANTS
from tests import reference as ref

PROMPTS, N_TOKENS = ref.GREEDY_PROMPTS, ref.GREEDY_TOKENS  # the same checks for every format
# See the module docstring for why these bounds hold on any CPU.
MEAN_KL_MAX = {"q8_0": 0.01, "q4_k_m": 0.02}
DECISIVE_TOP1_MIN = {"q8_0": 1.0, "q4_k_m": 0.99}  # q4_k_m: its 4-bit weights may cost a rare decisive flip


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


def _export_in_a_fresh_process(src, out, quant) -> dict:
    """export_gguf in a new process (so its peak memory is the export's own); the ExportResult's
    manifest, seconds and {stage: peak MB}, as JSON, plus the bundle path."""
    code = ("import json, sys; from medgemma_edge.export.bundle import export_gguf; "
            "r = export_gguf(sys.argv[1], sys.argv[2], sys.argv[3], None, threads=2); "
            "print(json.dumps({'seconds': r.seconds, 'peaks': r.peak_mb}))")
    run = subprocess.run([sys.executable, "-c", code, str(src), str(out), quant], capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    return {"manifest": json.loads((out / "manifest.json").read_text()), "bundle": out, **result}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, gemma270m_dir):
    root = tmp_path_factory.mktemp("g270m")
    return {q: _export_in_a_fresh_process(gemma270m_dir, root / q, q) for q in ("q8_0", "q4_k_m")}


def _report(e, quant):
    t = e["manifest"]["quality"]["text"]
    print(f"{quant}: top-1 {100 * t['top1_agreement']:.2f}% over {t['positions']} positions "
          f"({100 * t['top1_agreement_decisive']:.2f}% of {t['decisive_positions']} decisive), mean KL "
          f"{t['mean_kl']:.5f} (max {t['max_kl']:.3f}); export {e['seconds']:.1f} s, peak MB {e['peaks']}")
    return t


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_quality_report_against_the_f32_export(exported, quant):
    e = exported[quant]
    t = _report(e, quant)
    assert t["quant"] == quant and t["reference"] == "f32" and t["positions"] >= 300
    assert t["decisive_positions"] >= 100, "too few decisive positions for the rule to mean anything"
    assert t["top1_agreement_decisive"] >= DECISIVE_TOP1_MIN[quant]
    assert 0 < t["mean_kl"] < MEAN_KL_MAX[quant] and t["mean_kl"] <= t["max_kl"]
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


def test_conversion_streams(exported, gemma270m_dir):
    """Peak memory while writing GGUFs stays well below the checkpoint's size (one slice of rows
    plus the interpreter, torch and the tokenizer); llama.cpp's quantizer adds about one tensor
    in f32 and its quantized copy (here the 640 MiB embedding)."""
    size_mb = (gemma270m_dir / "model.safetensors").stat().st_size / 2**20
    largest_f32_mb = 262144 * 640 * 4 / 2**20
    for quant, e in exported.items():
        print(f"{quant}: peak MB {e['peaks']} converting a {size_mb:.0f} MB checkpoint in {e['seconds']:.1f} s")
        assert e["peaks"]["write"] < 0.6 * size_mb
        if quant in K_QUANTS:
            assert e["peaks"]["quantize"] < e["peaks"]["write"] + 1.5 * largest_f32_mb


def test_q8_0_on_real_text_keeps_every_decisive_answer(exported, gemma270m_bundle_f32):
    """Teacher-forced over a few hundred positions of real text (the paragraph the foundation test
    uses): q8_0 keeps the f32 export's top-1 wherever f32 is decisive, with a small mean KL (bounds
    and why they hold on any CPU: module docstring). Overall top-1 is printed, not asserted."""
    from pathlib import Path

    from llama_cpp import Llama

    from medgemma_edge.export.quality import kl_and_top1

    text = (Path(__file__).parent / "data" / "medical_text.txt").read_text()

    def scores(bundle):
        m = json.loads((bundle / "manifest.json").read_text())
        llm = Llama(str(bundle / m["files"][0]["path"]), n_ctx=1024, logits_all=True, n_threads=2, verbose=False)
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])

    ref32, q8 = scores(gemma270m_bundle_f32), scores(exported["q8_0"]["bundle"])
    kl, agree, decisive = kl_and_top1(ref32, q8)
    top2 = np.sort(ref32, axis=-1)[:, -2:]
    flips = np.round(top2[~agree, 1] - top2[~agree, 0], 3).tolist()
    print(f"q8_0 vs f32 on real text: top-1 {100 * agree.mean():.2f}% over {len(agree)} positions, "
          f"{100 * agree[decisive].mean():.2f}% of {decisive.sum()} decisive; mean KL {kl.mean():.5f}; "
          f"f32 top-2 gaps where top-1 flipped: {flips}")
    assert len(ref32) >= 250 and decisive.sum() >= 100
    assert agree[decisive].all(), f"a decisive position flipped; flips at gaps {flips}"
    assert kl.mean() < MEAN_KL_MAX["q8_0"]
