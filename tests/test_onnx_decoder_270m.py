"""Real Gemma 3 270M weights through the ONNX decoder (export/onnx_decoder.py, OnnxTextEngine):
greedy parity at fp32 with transformers, and int8 / int4 against fp32.

Exports are cached in the cache folder (onnx-decoders/), keyed by the sources of the export, the
builder's version and the checkpoint's recipe, so a second run only evaluates.

Quality bounds and the CPU (the reasoning of tests/test_export_gguf_270m.py): MatMulNBits rounds
activations to int8 (accuracy_level 4) with per-CPU kernels, so which near ties flip is not a
property of the export. What is: where fp32's top-1 leads by ≥ 1 nat (export/quality.py
DECISIVE_GAP) the quantized graph keeps it, and mean KL over a few hundred positions stays under a
bound ~2.5× above the value measured (teacher-forced over tests/data/medical_text.txt, 290
positions, 153 decisive; numbers in MEASURED).
"""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests import reference as ref

PROMPTS, N_TOKENS = ref.GREEDY_PROMPTS, ref.GREEDY_TOKENS  # the same checks for every format
# Teacher-forced vs the fp32 graph, 290 positions of medical text (2 threads):
# (top-1 %, decisive top-1 %, mean KL). export/onnx_decoder.py compares the int4 options.
MEASURED = {"int8": (97.9, 100.0, 0.0040), "int4": (74.1, 92.8, 0.276)}
MEAN_KL_MAX = {"int8": 0.01, "int4": 0.7}
# int4 on 270M flips decisive answers (gaps up to 9 nats): the bound guards against a broken
# tensor (RTN without the int8 head: 77.8 %), not for faithfulness — 270M is fragile at 4 bits.
DECISIVE_TOP1_MIN = {"int8": 1.0, "int4": 0.85}
# Next-token logits of the 5 chat prompts (fast check): decisive top-1 kept, KL per prompt bounded
# (int8 measured 0.006 .. 0.019).
PROMPT_KL_MAX = {"int8": 0.05, "int4": 0.5}


class NoVocab:
    pass


def _source_key(src: Path) -> str:
    import onnxruntime_genai

    from medgemma_edge.export import onnx_builder_fixes, onnx_decoder

    h = hashlib.sha256()
    for mod in (onnx_decoder, onnx_builder_fixes):
        h.update(Path(mod.__file__).read_bytes())
    h.update(onnxruntime_genai.__version__.encode())
    h.update((src / ".stamp").read_bytes())
    return h.hexdigest()[:16]


def _cached_export(src: Path, quant: str) -> tuple[Path, dict, dict]:
    from medgemma_edge.export.onnx_decoder import export_decoder, write_embeddings
    from medgemma_edge.runtime.cache import cache_root

    out = cache_root() / "onnx-decoders" / f"gemma3-270m-{quant}-{_source_key(src)}"
    record = out / "export.json"
    if not record.exists():
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        info = export_decoder(src, tmp, quant, threads=2, say=lambda s: None)
        emb = write_embeddings(src, tmp, "fp32" if quant == "fp32" else "int8", say=lambda s: None)
        (tmp / "export.json").write_text(json.dumps([info, emb]))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    info, emb = json.loads(record.read_text())
    return out, info, emb


def _engine(built, n_ctx=1024):
    from medgemma_edge.runtime.backends.onnx_embeddings import EmbeddingTable
    from medgemma_edge.runtime.backends.onnx_text import OnnxTextEngine

    folder, info, emb = built
    return OnnxTextEngine(folder / info["file"], info, EmbeddingTable(folder, emb), NoVocab(), n_ctx=n_ctx, threads=2)


@pytest.fixture(scope="module")
def built(gemma270m_dir):
    """Exports on first use: int4's k_quant takes ~5 min on 2 cores, so only slow tests ask for it."""
    cache = {}

    def get(quant):
        if quant not in cache:
            cache[quant] = _cached_export(gemma270m_dir, quant)
        return cache[quant]
    return get


@pytest.fixture(scope="module")
def fp32(built):
    return _engine(built("fp32"))


def _chat(text):
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


@pytest.mark.parametrize("i", range(len(PROMPTS)))
def test_fp32_greedy_32_tokens_match_transformers(fp32, gemma270m_dir, i):
    msgs = _chat(PROMPTS[i])
    ids = ref.encode_chat(gemma270m_dir, msgs)["input_ids"][0].tolist()
    theirs, their_logits = ref.greedy_generate(gemma270m_dir, msgs, N_TOKENS)
    ours, worst = ref.drive_greedy(fp32, ids, theirs, their_logits)
    if ours != theirs[:len(ours)]:
        step = len(ours) - 1
        tie, gap = ref.near_tie(their_logits[step])
        print(f"prompt {i}: step {step} ours {ours[-1]} vs transformers {theirs[step]}, their top-2 gap {gap:.2e}")
        assert tie, f"prompt {i}: greedy diverges at step {step} without a near-tie (gap {gap:.2e})"
    print(f"prompt {i}: {len(ours)} of {len(theirs)} tokens equal, worst |d| {worst:.2e}")
    assert len(ours) == len(theirs) or ours[-1] != theirs[len(ours) - 1]
    assert worst < 1e-3  # measured 7e-5 .. 1.3e-4 (f32 summation order over 18 layers, logits ~±30)


def _prompt_logits(engine, gemma270m_dir):
    rows = []
    for text in PROMPTS:
        engine.reset()
        engine.eval_tokens(ref.encode_chat(gemma270m_dir, _chat(text))["input_ids"][0].tolist())
        rows.append(engine.logits().copy())
    return np.array(rows)


@pytest.mark.parametrize("quant", ["int8", pytest.param("int4", marks=pytest.mark.slow)])
def test_quantized_next_token_close_to_fp32(built, fp32, gemma270m_dir, quant):
    from medgemma_edge.export.quality import kl_and_top1

    ref32 = _prompt_logits(fp32, gemma270m_dir)
    got = _prompt_logits(_engine(built(quant)), gemma270m_dir)
    kl, agree, decisive = kl_and_top1(ref32, got)
    folder, info, _ = built(quant)
    size = sum((folder / f).stat().st_size for f in [info["file"], *info["data_files"]])
    print(f"{quant} ({size / 2**20:.0f} MiB): KL per prompt {np.round(kl, 4).tolist()}, top-1 {agree.tolist()}, "
          f"decisive {decisive.tolist()}")
    assert agree[decisive].all() and kl.max() < PROMPT_KL_MAX[quant]


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_teacher_forced_on_real_text(built, fp32, gemma270m_dir, quant):
    """Teacher-forced over 290 positions of real text: decisive top-1 and mean KL bounds (module
    docstring). One position per step (the graph returns the last position's logits only)."""
    from transformers import AutoTokenizer

    from medgemma_edge.export.quality import kl_and_top1

    text = (Path(__file__).parent / "data" / "medical_text.txt").read_text()
    ids = AutoTokenizer.from_pretrained(gemma270m_dir)(text)["input_ids"][:320]

    def logits(engine):
        engine.reset()
        rows = []
        for t in ids:
            engine.eval_tokens([t])
            rows.append(engine.logits().copy())
        return np.array(rows)

    ref32, got = logits(fp32), logits(_engine(built(quant)))
    kl, agree, decisive = kl_and_top1(ref32, got)
    print(f"{quant} vs fp32: top-1 {100 * agree.mean():.1f}% of {len(agree)}, decisive "
          f"{100 * agree[decisive].mean():.1f}% of {decisive.sum()}, mean KL {kl.mean():.4f}")
    assert decisive.sum() >= 100
    assert agree[decisive].mean() >= DECISIVE_TOP1_MIN[quant] and kl.mean() < MEAN_KL_MAX[quant]
