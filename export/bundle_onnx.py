"""checkpoint dir → ONNX bundle dir: every model file run by onnxruntime (CPU, or CUDA with onnxruntime-gpu).

Files (manifest role): decoder.onnx ("text") and its external weights ("text_data"), the
embedding table the decoder's `inputs_embeds` is gathered from ("embeddings"), tokenizer.gguf —
the vocabulary alone, read by llama.cpp without weights ("tokenizer") — and the vision tower +
projector graphs ("vision", onnx-f32 / onnx-int8 / onnx-int8-vnni). The decoder's description
(layers, cache shape, attention-bias inputs, embedding scale, builder version) is the manifest's
"decoder" entry, the table's the "embeddings" entry.

Orchestration only: the decoder and table are export/onnx_decoder, the vocabulary
export/gguf_tokenizer, the vision graphs export/onnx_vision (through export/bundle.ExportPlan, as
for a GGUF bundle), the report export/quality, run here through the runtime's own ONNX engine.
Same order of work as export/bundle.py: model files → references in intermediate/ → quality
report → intermediates removed → manifest written last.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np

from medgemma_edge.export.bundle import (INTERMEDIATE_DIR, ExportPlan, ExportResult, bundle_manifest,
                                          prepare_out, requested_vision_quants)
from medgemma_edge.export.quants import DEFAULT_TEXT_QUANT, DEFAULT_VISION_QUANTS, ONNX_TEXT_QUANTS, ONNX_VISION_QUANTS
from medgemma_edge.runtime.errors import ExportError
from medgemma_edge.runtime.memory import peak_rss_mb

DEFAULT_QUANT = DEFAULT_TEXT_QUANT["onnx"]
# The ONNX members of the GGUF default: int8 towers for any x86 CPU and for CPUs with VNNI.
DEFAULT_VISION = tuple(v for v in DEFAULT_VISION_QUANTS if v in ONNX_VISION_QUANTS)
TEXT_REFERENCE, VISION_REFERENCE = "fp32", "onnx-f32"  # the float graphs the report compares with
ALL_POSITIONS = {"prune_lm_head": "false"}  # builder option: logits for every position
TEACHER_CHUNK = 128  # positions per evaluation of an unpruned graph: 128 x 262k logits = 134 MB


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def export_onnx(src, out, quant: str = DEFAULT_QUANT, vision_quant=None, *, quality=True, threads: int = 0,
                overwrite: bool = False, keep_intermediate: bool = False) -> ExportResult:
    """Export a local Gemma 3 / MedGemma checkpoint to an ONNX bundle in `out`.

    quant: the decoder's weights, fp32 / int8 / int4 (export/quants.ONNX_TEXT_QUANTS).
    vision_quant: one or several of onnx-f32 / onnx-int8 / onnx-int8-vnni (default DEFAULT_VISION);
    the first is the primary, `load(vision="auto")` picks the fastest faithful one where it runs.
    quality: measure the quantized decoder against an fp32 build (next-token KL and top-1 on the
    shipped prompts) and each vision file against onnx-f32 (image-embedding cosine).
    """
    from medgemma_edge.export import quality as q
    from medgemma_edge.export.gguf_tokenizer import TOKENIZER_NAME, write_tokenizer_gguf
    from medgemma_edge.export.onnx_decoder import export_decoder, write_embeddings

    if quant not in ONNX_TEXT_QUANTS:
        raise ExportError(f"--quant {quant} is not an ONNX decoder type; --format onnx takes "
                          f"{', '.join(ONNX_TEXT_QUANTS)}")
    vision_quants = requested_vision_quants(vision_quant, DEFAULT_VISION, ONNX_VISION_QUANTS,
                                            "--vision-quant {bad} cannot go in an ONNX bundle; --format onnx "
                                            "takes {allowed}")
    t0 = time.perf_counter()
    plan = ExportPlan.read(src)
    if not plan.vision:
        vision_quants = ()
    out = prepare_out(out, overwrite)
    inter = out / INTERMEDIATE_DIR
    inter.mkdir(exist_ok=True)
    lossy = quant != TEXT_REFERENCE
    n_steps = 3 + bool(quality and lossy) + bool(vision_quants) + bool(quality)
    step = iter(range(1, n_steps + 1))

    say(f"[{next(step)}/{n_steps}] tokenizer: {TOKENIZER_NAME} ({len(plan.vocab.tokens)} tokens, no weights)")
    tokenizer = write_tokenizer_gguf(plan.text, plan.vocab, plan.special, plan.chat_template, out / TOKENIZER_NAME,
                                     name=plan.ckpt.path.name)
    say(f"[{next(step)}/{n_steps}] text decoder {quant}")
    decoder = export_decoder(plan.ckpt.path, out, quant, threads=threads, say=say)
    say(f"[{next(step)}/{n_steps}] embedding table")
    embeddings = write_embeddings(plan.ckpt.path, out, quant, say=say)
    text_ref = None
    if quality and lossy:
        say(f"[{next(step)}/{n_steps}] {TEXT_REFERENCE} reference decoder for the quality report (intermediate)")
        ref_dir = inter / TEXT_REFERENCE
        # its LM head on every position: one pass per prompt instead of one per token (a 4B fp32
        # decoder is slow per token on a CPU)
        text_ref = {"dir": ref_dir, "decoder": export_decoder(plan.ckpt.path, ref_dir, TEXT_REFERENCE,
                                                              threads=threads, say=say, options=ALL_POSITIONS),
                    "embeddings": write_embeddings(plan.ckpt.path, ref_dir, TEXT_REFERENCE, say=say)}
    vision_paths = {}
    if vision_quants:
        say(f"[{next(step)}/{n_steps}] vision: {', '.join(vision_quants)}")
        vision_paths = {vq: plan.write_vision(out / plan.vision_name(vq), vq, scratch=inter) for vq in vision_quants}
    vision_ref = None
    if quality and any(vq != VISION_REFERENCE for vq in vision_quants):
        vision_ref = vision_paths.get(VISION_REFERENCE) or plan.write_vision(
            inter / plan.vision_name(VISION_REFERENCE), VISION_REFERENCE, scratch=inter)
    peak = {"write": peak_rss_mb()}

    report, vision_reports = {}, {}
    if quality:
        say(f"[{next(step)}/{n_steps}] quality report")
    if text_ref is not None:
        mine = {"dir": out, "decoder": decoder, "embeddings": embeddings}
        report["text"] = {"quant": quant, **compare_text_onnx(text_ref, mine, tokenizer, plan.chat_template,
                                                              threads, scratch=inter)}
    if vision_ref is not None:
        image = {"mean": plan.vision.image_mean, "std": plan.vision.image_std}  # the ONNX graph's input
        for vq, path in vision_paths.items():
            if vq != VISION_REFERENCE:
                vision_reports[vq] = {"quant": vq, **q.compare_vision(
                    None, vision_ref, path, plan.vision.image_size, threads, VISION_REFERENCE, image=image,
                    n_embd=plan.text.hidden_size)}
        report["vision"] = vision_reports.get(vision_quants[0]) or next(iter(vision_reports.values()))
        if len(vision_quants) > 1:
            report["vision_files"] = list(vision_reports.values())
    if report:
        peak["quality"] = peak_rss_mb()
    for line in q.summary_lines(report or None) if quality else ():
        say(f"  {line}")
    if not (keep_intermediate and any(inter.iterdir())):
        shutil.rmtree(inter)

    manifest = onnx_manifest(plan, out, quant, vision_quants, decoder, embeddings, tokenizer, vision_paths,
                             vision_reports, report or None)
    from medgemma_edge.export.probe import add_probe
    from medgemma_edge.runtime.manifest import write_manifest

    add_probe(out, manifest, threads)  # the self-check's reference, measured here (runtime/selfcheck.py)
    write_manifest(out, manifest)
    say(f"ONNX bundle written to {out.name} in {time.perf_counter() - t0:.0f} s")
    return ExportResult(out, manifest, time.perf_counter() - t0, peak)


def onnx_manifest(plan: ExportPlan, out: Path, quant, vision_quants, decoder: dict, embeddings: dict,
                  tokenizer: Path, vision_paths: dict, vision_reports: dict, quality) -> dict:
    """export/bundle.py's manifest, for the ONNX files: backend "onnx", the decoder's graph file
    first ("text"), then its external weights, the embedding table and the tokenizer."""
    from medgemma_edge.runtime.manifest import file_entry

    manifest = bundle_manifest(plan, out, quant, vision_quants, out / decoder["file"], vision_paths, vision_reports,
                         quality)
    text, vision = manifest["files"][0], manifest["files"][1:]
    for entry in vision:  # the float graph is the reference arithmetic itself
        if entry.get("quant") == VISION_REFERENCE:
            entry["fidelity"] = 1.0
    files = ([text] + [file_entry(out, "text_data", f) for f in decoder.get("data_files", [])]
             + [file_entry(out, "embeddings", f) for f in embeddings["files"]]
             + [file_entry(out, "tokenizer", tokenizer.name)] + vision)
    manifest.update(backend="onnx", files=files, decoder=decoder, embeddings=embeddings)
    manifest["quantization"]["text"] = quant
    return manifest


# -- the text report through the runtime's ONNX engine ------------------------------------------

def compare_text_onnx(reference: dict, quantized: dict, tokenizer: Path, chat_template: str, threads: int = 0,
                      *, scratch: Path) -> dict:
    """Teacher-forced next-token agreement of the quantized decoder with the fp32 one over the shipped
    prompts (export/quality.py). Each side: {"dir", "decoder": info, "embeddings": info}."""
    from medgemma_edge.export import quality as q
    from medgemma_edge.runtime.backends.llama_vocab import LlamaVocab

    prompts = q.load_prompts()
    vocab = LlamaVocab(tokenizer)
    try:
        seqs = [vocab.tokenize(t, special=True) for t in q.render_exchanges(chat_template, prompts)]
        n_ctx = max(len(s) for s in seqs) + 8
        return q.compare_sequences(seqs, _runner(reference, vocab, n_ctx, threads),
                                   _runner(quantized, vocab, n_ctx, threads), TEXT_REFERENCE, len(prompts),
                                   scratch=scratch)
    finally:
        vocab.close()


def _runner(side: dict, vocab, n_ctx: int, threads: int):
    def open_():
        engine = open_onnx_engine(side["dir"], side["decoder"], side["embeddings"], vocab, n_ctx=n_ctx,
                                  threads=threads)
        return (lambda ids: teacher_forced(engine, ids)), getattr(engine, "close", lambda: None)
    return open_


def open_onnx_engine(folder: Path, decoder: dict, embeddings: dict, vocab, *, n_ctx: int, threads: int = 0,
                     providers=("CPUExecutionProvider",)):
    """The runtime's ONNX text engine over a decoder and table in `folder` (the runtime opens its
    bundle the same way, runtime/engines.py)."""
    from medgemma_edge.runtime.backends.onnx_embeddings import EmbeddingTable
    from medgemma_edge.runtime.backends.onnx_text import OnnxTextEngine

    table = EmbeddingTable(folder, embeddings)
    return OnnxTextEngine(folder / decoder["file"], decoder, table, vocab, n_ctx=n_ctx, threads=threads,
                          providers=tuple(providers))


def teacher_forced(engine, ids: list[int]) -> np.ndarray:
    """Logits (len(ids), vocab) at every position of one token sequence, from an empty cache. A
    bundle's graph computes the LM head for the last position only (export/onnx_decoder.py,
    prune_lm_head: a 512-token prefill would make 512 × 262k logits), so it goes one position per
    step; the reference graph is built with every position's logits (ALL_POSITIONS) and goes
    TEACHER_CHUNK positions per step."""
    engine.truncate(0)
    rows = np.empty((len(ids), engine.n_vocab), np.float32)
    every = str(engine.info.get("options", {}).get("prune_lm_head", "true")).lower() == "false"
    step = TEACHER_CHUNK if every else 1
    for i in range(0, len(ids), step):
        chunk = ids[i:i + step]
        engine.eval_tokens(chunk)
        got = engine.logits_rows()
        if len(got) != len(chunk):
            raise ExportError(f"the decoder gave {len(got)} logit rows for {len(chunk)} positions")
        rows[i:i + len(chunk)] = got
    return rows
