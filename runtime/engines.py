"""The text engine a bundle's manifest names: llama.cpp for "gguf", onnxruntime for "onnx".

Both engines offer one interface (runtime/backends/llama_engine.LlamaEngine: eval_tokens,
eval_embeddings, logits, n_past, n_ctx, sync_prefix, truncate, save_state / load_state, reserve,
set_threads, n_embd, tokenize / piece / end_ids / is_end), so `Model`, prefill, generation, the
image cache and the prefix cache run unchanged on either.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medgemma_edge.runtime.errors import BundleError, InputError

BACKENDS = ("gguf", "onnx")
# llama.cpp's KV cache types offered (--kv-cache); f16 is llama.cpp's own default. q8_0 halves the
# cache (a prepared study's saved prefix with it) and needs flash attention (llama_engine.py); the
# measured cost and gain are in benchmarks/results/KV_CACHE.md. ONNX bundles keep their own float32
# cache and take only the default.
KV_CACHES = ("f16", "q8_0")
DEFAULT_KV_CACHE = "f16"
KV_CACHE_HELP = ("the KV cache's type: q8_0 holds about half the memory, makes a prepared study about half the "
                 "size on disk and turns on llama.cpp's flash attention; GGUF bundles only (its cost in "
                 "faithfulness and speed: benchmarks/results/KV_CACHE.md)")


@dataclass
class Opened:
    engine: object
    gpu: bool  # the decoder runs on a GPU (vision_choice ranks the vision files for it)


def gpu_layers(device: str) -> int:
    """llama.cpp layers to offload for --device: none, or all of them (-1)."""
    import llama_cpp

    if device == "cpu":
        return 0
    has_gpu = bool(llama_cpp.llama_supports_gpu_offload())
    if device == "cuda" and not has_gpu:
        from medgemma_edge.runtime.backends.providers import LLAMA_GPU_REBUILD

        raise InputError("device 'cuda' asked for, but this llama-cpp-python was built without GPU "
                         f"support — rebuild it ({LLAMA_GPU_REBUILD}), or use --device cpu")
    return -1 if has_gpu else 0


def check_backend(bundle: Path, manifest: dict) -> str:
    backend = manifest.get("backend")
    if backend not in BACKENDS:
        raise BundleError(f"this runtime reads {' and '.join(BACKENDS)} bundles; {bundle.name} is "
                          f"'{str(backend):.20}' — upgrade medgemma-edge, or export the bundle again")
    return backend


def check_kv_cache(kv_cache, backend: str = "gguf") -> None:
    """InputError, one line, for a KV cache type this backend does not offer."""
    if kv_cache not in KV_CACHES:
        raise InputError(f"unknown KV cache type {kv_cache!r:.20} — use one of {', '.join(KV_CACHES)}")
    if backend == "onnx" and kv_cache != DEFAULT_KV_CACHE:
        raise InputError(f"--kv-cache {kv_cache} is llama.cpp's; an ONNX bundle keeps its own float32 cache — "
                         f"leave it at {DEFAULT_KV_CACHE}, or use a GGUF bundle")


def open_engine(bundle: Path, manifest: dict, *, device: str, threads: int, n_ctx: int,
                repack="auto", kv_cache: str = DEFAULT_KV_CACHE, flash_attn: bool | None = None) -> Opened:
    """The text engine for the bundle in `bundle`, as its manifest describes it. flash_attn: llama.cpp's
    (None: where the cache type needs it; speculative decoding asks for it, runtime/spec_choice.py)."""
    from medgemma_edge.runtime.repack_choice import check_repack, decide  # repack: True, False or "auto"

    backend = check_backend(bundle, manifest)
    check_kv_cache(kv_cache, backend)
    check_repack(repack)
    files = {}
    for f in manifest["files"]:
        files.setdefault(f["role"], []).append(bundle / f["path"])
    if backend == "gguf":
        from medgemma_edge.runtime.backends.llama_engine import LlamaEngine

        layers = gpu_layers(device)
        repack, mmap = decide(repack, gpu=layers != 0)
        engine = LlamaEngine(str(files["text"][0]), n_ctx=n_ctx, threads=threads, n_gpu_layers=layers,
                             repack=repack, mmap=mmap, kv_cache=kv_cache, flash_attn=flash_attn)
        return Opened(engine, layers != 0)
    return _open_onnx(bundle, manifest, files, device=device, threads=threads, n_ctx=n_ctx)


def _open_onnx(bundle: Path, manifest: dict, files: dict, *, device: str, threads: int, n_ctx: int) -> Opened:
    from medgemma_edge.runtime.backends.llama_vocab import LlamaVocab
    from medgemma_edge.runtime.backends.onnx_embeddings import EmbeddingTable
    from medgemma_edge.runtime.backends.onnx_text import OnnxTextEngine
    from medgemma_edge.runtime.backends.providers import CUDA, choose_providers

    listed = {p.name for p in files.get("embeddings", [])}
    if not manifest["embeddings"]["files"] or not set(manifest["embeddings"]["files"]) <= listed:
        raise BundleError(f"the ONNX bundle {bundle.name} lists no checked embedding table — export it again")
    providers = choose_providers(device)
    vocab = LlamaVocab(files["tokenizer"][0])
    table = EmbeddingTable(bundle, manifest["embeddings"])
    engine = OnnxTextEngine(files["text"][0], manifest["decoder"], table, vocab, n_ctx=n_ctx, threads=threads,
                            providers=tuple(providers))
    return Opened(engine, providers[0] == CUDA)
