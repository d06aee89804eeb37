"""onnxruntime-genai's own `Generator` on the model builder's own Gemma 3 decoder: the reference
loop our ONNX decoder loop (runtime/backends/onnx_text.py) is measured against (issue 15: ours
≥ 1.0× the Generator's decode tok/s).

Our bundle's graph comes from the same builder but the Generator cannot run it (inputs_embeds in,
two attention-bias inputs, non-causal GQA, no genai_config.json). `build_genai_decoder` builds
the builder's *own* graph: token ids in (the embedding table inside, float32 unless int4), causal
GQA with the window in the kernel, genai_config.json and tokenizer files, with our bundle's
weight options (QUANT_OPTIONS, prune_lm_head) and only the fixes of export/onnx_builder_fixes.py
that the build or the arithmetic needs (transformers-4 import, `rope_scaling: null`, unscaled rope
on the sliding layers; weights loaded and quantized as our export does). A
Gemma3ForConditionalGeneration checkpoint gets the builder's `gemma3_vl_text` type: the text
decoder alone, which the Generator runs as a plain LLM. The builder's default `windowed_kv_cache`
(sliding layers cache only their window) differs from our graph; `windowed=False` matches it.

Stage numbers (GenaiBackend.text_only), on the token ids our runtime renders for the same chat:
- prefill tok/s: prompt tokens over `append_tokens(prompt)` + the first `generate_next_token`
  (which only picks the token from the prompt's logits);
- decode tok/s: (tokens - 1) over the wall clock from the first token to the last (each step one
  forward and one greedy pick), as our runtime counts it;
- ttft_s: from rendering the prompt to the first token.

    python -m benchmarks.backend_genai --src CKPT --bundle ONNX_BUNDLE --quant int8 [--threads 2]
        [--compare: also our runtime, alternating rounds, and how many greedy ids agree]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
import time
from pathlib import Path

from benchmarks.alternate import MIN_ROUNDS, MIN_TOKENS, alternate, paired_rates
from benchmarks.backends import Backend, Case, say
from benchmarks.tables import paired_ratio

STAMP = ".genai-stamp"
SYSTEM_TEXT = "You are a helpful medical assistant."  # what RuntimeBackend.text_only asks with


def genai_options(quant: str, windowed: bool = True) -> dict:
    """Builder extra options: our bundle's weight options for `quant`, the builder's defaults else."""
    from medgemma_edge.export.onnx_decoder import BASE_OPTIONS, QUANT_OPTIONS, QUANTS

    if quant not in QUANTS:
        raise ValueError(f"unknown quant {quant!r}: one of {QUANTS}")
    opts = {**QUANT_OPTIONS[quant], "prune_lm_head": BASE_OPTIONS["prune_lm_head"]}
    if not windowed:
        opts["windowed_kv_cache"] = "false"
    return opts


# What we take from export/onnx_builder_fixes.decoder_builder_class: the rope fix, and how it loads
# and quantizes weights (export/onnx_lean.py where present: stored width, one weight at a time).
# Every other override there (the attention rewrite, no genai config, no tokenizer files) is undone.
KEEP = {"make_rotary_embedding_multi_cache", "load_weights", "to_nbits"}


@contextlib.contextmanager
def _builder_patched(builder, src: Path, config):
    """Inside: the builder module reads our fixed config and builds its own Gemma 3 graph, with
    only the methods in KEEP taken from our DecoderBuilder."""
    from medgemma_edge.export.onnx_builder_fixes import decoder_builder_class, details

    original = builder.Gemma3Model
    saved = builder.get_hf_details, original
    fixed = decoder_builder_class(original, fix_local_rope=True)

    undo = {name: getattr(original, name) for name, value in vars(fixed).items()
            if callable(value) and not name.startswith("__") and name not in KEEP and hasattr(original, name)}
    builder.get_hf_details = lambda *a, **k: details(builder, src, config)
    builder.Gemma3Model = type("GenaiBuilder", (fixed,), undo)
    try:
        yield
    finally:
        builder.get_hf_details, builder.Gemma3Model = saved


def build_genai_decoder(src: Path, out_dir: Path, quant: str, *, windowed: bool = True,
                        threads: int = 0) -> Path:
    """out_dir holding the builder's model.onnx + genai_config.json for `src`, built on first use."""
    from medgemma_edge.export.checkpoint import open_checkpoint
    from medgemma_edge.export.onnx_builder_fixes import load_config
    from medgemma_edge.export.onnx_decoder import BUILDER, run_builder

    src, out_dir, opts = Path(src), Path(out_dir), genai_options(quant, windowed)
    stamp = json.dumps({"config": hashlib.sha256((src / "config.json").read_bytes()).hexdigest()[:16],
                        "weights": sorted((p.name, p.stat().st_size) for p in src.glob("*.safetensors")),
                        "quant": quant, "options": opts, "builder": BUILDER})
    if (out_dir / STAMP).is_file() and (out_dir / STAMP).read_text() == stamp:
        return out_dir
    ckpt = open_checkpoint(src)
    config = load_config(src, ckpt.architecture)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / STAMP).unlink(missing_ok=True)
    say(f"[genai] building {src.name} {quant} ({ckpt.architecture}) with {BUILDER}: {opts}")
    t0 = time.perf_counter()
    run_builder(src, out_dir, quant, opts, config, lambda builder: _builder_patched(builder, src, config),
                threads=threads)
    (out_dir / STAMP).write_text(stamp)
    say(f"[genai] built in {time.perf_counter() - t0:.1f} s -> {out_dir}")
    return out_dir


def prompt_ids(vocab, text: str) -> list[int]:
    """The ids our runtime evaluates for RuntimeBackend.text_only's chat (runtime/chat.py)."""
    from medgemma_edge.runtime import chat as chatfmt

    messages = [{"role": "system", "content": SYSTEM_TEXT}, {"role": "user", "content": text}]
    return chatfmt.tokenize_prompt(chatfmt.prompt_parts(messages), vocab.tokenize)


class GenaiBackend(Backend):
    """decoder_dir: a finished build_genai_decoder folder; tokenizer: the bundle's tokenizer.gguf
    (or any GGUF of the same vocabulary), so the Generator sees exactly our token ids."""

    def __init__(self, decoder_dir: str, tokenizer: str, threads: int, context: int = 4096):
        self.decoder_dir, self.tokenizer, self.threads, self.context = decoder_dir, tokenizer, threads, context
        self.model = self.vocab = None
        self.window = 0  # a sliding layer's cache capacity in the build (0: full caches)
        self.last_ids: list[int] = []  # the tokens the last text_only generated

    def imports(self) -> None:
        import onnxruntime_genai  # noqa: F401
        import medgemma_edge.runtime.backends.llama_vocab  # noqa: F401

    def load(self) -> dict:
        import onnxruntime_genai as og
        from medgemma_edge.runtime.backends.llama_vocab import LlamaVocab

        t0 = time.perf_counter()
        config = og.Config(self.decoder_dir)
        config.clear_providers()  # CPU
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": self.threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)
        self.vocab = LlamaVocab(self.tokenizer)
        genai = json.loads((Path(self.decoder_dir) / "genai_config.json").read_text())
        sliding = genai["model"]["decoder"].get("sliding_window") or {}
        self.window = int(sliding.get("window_size", 0)) + int(sliding.get("cache_slack", 0))
        return {"load_text_s": round(time.perf_counter() - t0, 3), "genai_type": self.model.type}

    def text_only(self, case: Case) -> dict:
        import onnxruntime_genai as og

        t0 = time.perf_counter()
        ids = prompt_ids(self.vocab, case.text_prompt())
        # Windowed caches: og sizes a sliding layer's cache min(max_length, window + slack) and the
        # kernel refuses one under the window, so max_length is at least the window.
        max_length = max(len(ids) + case.decode_tokens, self.window)
        if max_length > self.context:
            raise ValueError(f"max_length {max_length} ({len(ids)} prompt tokens) exceeds the context {self.context}")
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, do_sample=False, num_beams=1,
                                  repetition_penalty=1.0, min_length=0)
        gen = og.Generator(self.model, params)
        t_pre = time.perf_counter()
        gen.append_tokens(ids)
        gen.generate_next_token()  # picks from the prompt's logits: no forward
        t_first = time.perf_counter()
        out = [int(gen.get_next_tokens()[0])]
        while len(out) < case.decode_tokens and not gen.is_done():
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        t_last = time.perf_counter()
        self.last_ids = out
        del gen
        return {"ttft_s": round(t_first - t0, 4), "prompt_tokens": len(ids),
                "prefill_tok_s": round(len(ids) / (t_first - t_pre), 2),
                "decode_tok_s": round((len(out) - 1) / (t_last - t_first), 2) if len(out) > 1 else None,
                "decode_tokens": len(out),
                "finish_reason": "length" if len(out) >= case.decode_tokens else "stop"}

    def ask(self, case: Case) -> dict:
        raise NotImplementedError("text only: the builder's gemma3_vl_text graph has no image input")

    def close(self) -> None:
        self.model = self.vocab = None


def main(argv=None) -> int:
    from benchmarks.backend_runtime import RuntimeBackend
    from medgemma_edge.runtime.cache import cache_root

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, type=Path, help="Gemma 3 checkpoint folder")
    p.add_argument("--bundle", required=True, help="our ONNX bundle (its tokenizer.gguf is used)")
    p.add_argument("--quant", default="int8", choices=("fp32", "int8", "int4"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="build folder (default: the cache's bench/genai/...)")
    p.add_argument("--full-kv", action="store_true", help="windowed_kv_cache=false, as our graph")
    p.add_argument("--decode-tokens", type=int, default=MIN_TOKENS)
    p.add_argument("--prompt-words", type=int, default=60)
    p.add_argument("--rounds", type=int, default=MIN_ROUNDS,
                   help="measured rounds (alternating with ours under --compare)")
    p.add_argument("--compare", action="store_true", help="also our runtime on the bundle")
    a = p.parse_args(argv)
    out = a.out or cache_root() / "bench" / "genai" / f"{a.src.name}-{a.quant}{'-fullkv' if a.full_kv else ''}"
    decoder = build_genai_decoder(a.src, out, a.quant, windowed=not a.full_kv, threads=a.threads)
    case = Case(image="", decode_tokens=a.decode_tokens, text_prompt_words=a.prompt_words, threads=a.threads)
    runs = {"genai": GenaiBackend(str(decoder), str(Path(a.bundle) / "tokenizer.gguf"), a.threads, case.context)}
    if a.compare:
        runs["ours"] = RuntimeBackend(a.bundle, a.threads, case.context, open_vision=False)
    result = {"decoder": decoder.name, "options": genai_options(a.quant, not a.full_kv)}
    for name, b in runs.items():
        b.imports()
        result[f"load_{name}"] = b.load()

    def run(name, b):
        if name == "ours":
            b.model.engine.reset()  # a fresh prefill, as the Generator's
        result[name] = b.text_only(case)
        return result[name]["decode_tok_s"]

    # alternating, so that other work on the machine hits both alike
    result["decode_tok_s"] = alternate({name: (lambda name=name, b=b: run(name, b)) for name, b in runs.items()},
                                       a.rounds, "genai")
    if a.compare:
        model, messages = runs["ours"].model, [{"role": "system", "content": SYSTEM_TEXT},
                                               {"role": "user", "content": case.text_prompt()}]
        ids = [r.token for r in model.stream(messages, max_new_tokens=case.decode_tokens, repetition_guard=False)
               if r.token is not None]  # as many as the Generator's, loop or not
        theirs = runs["genai"].last_ids
        n = min(len(ids), len(theirs))  # how many leading ids the two greedy runs share:
        result["ids_agree"] = {"first": next((i for i in range(n) if ids[i] != theirs[i]), n), "of": n,
                               "genai": theirs[:16], "ours": ids[:16]}
        p = paired_rates(result["decode_tok_s"], "ours", "genai")
        result["ours_over_genai_decode"] = p
        say(f"[genai] decode ours / Generator: {paired_ratio(p)}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
