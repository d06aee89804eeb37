"""A llama.cpp context driven directly through llama-cpp-python's C bindings.

We skip the high-level `Llama` class so that one KV cache can take both token ids and image
embeddings (Gemma 3's image block attends to itself bidirectionally, as in transformers), and so
that the evaluated prefix of a conversation can be kept between questions: `sync_prefix` compares
what is cached with what the next prompt needs and drops only the tail that differs.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

from medgemma_edge.runtime.backends.llama_vocab import LlamaTokenizing, init_backend
from medgemma_edge.runtime.engines import DEFAULT_KV_CACHE, check_kv_cache
from medgemma_edge.runtime.errors import BundleError, InputError, MedGemmaEdgeError
from medgemma_edge.runtime.machine import resolve_threads


def default_batch(gpu: bool) -> int:
    """Prompt tokens per micro-batch, from the machine: a GPU keeps gaining up to about 2048; a
    CPU's prefill rate is flat from a few hundred up, and 512 keeps its compute buffer small."""
    return 2048 if gpu else 512


def decode_error(rc: int, n_ctx: int) -> Exception:
    """llama_decode's return codes (llama.h) as errors that say what happened."""
    if rc == 1:  # no KV-cache slot for the batch
        return InputError(f"the context of {n_ctx} tokens has no room left for this batch — "
                          "shorten the conversation or the prompt, or raise --context")
    if rc == 2:
        return MedGemmaEdgeError("llama.cpp aborted the evaluation — ask again")
    if rc == -1:
        return MedGemmaEdgeError("llama.cpp rejected the batch as invalid (code -1) — this is a bug in "
                                 "medgemma-edge; please report it with the command you ran")
    return MedGemmaEdgeError(f"llama.cpp failed to evaluate the prompt (code {rc}), often for lack of "
                             "memory — close other programs, use a smaller --context, or a smaller quant")


class LlamaEngine(LlamaTokenizing):
    """One model, one context, one sequence. Positions are counted from 0 for the whole cache.
    tokenize / piece / end_ids / is_end: runtime/backends/llama_vocab.LlamaTokenizing."""

    def __init__(self, gguf_path: str, *, n_ctx: int = 4096, threads: int | None = None,
                 n_gpu_layers: int = 0, n_batch: int | None = None, repack: bool = False,
                 kv_cache: str = DEFAULT_KV_CACHE, flash_attn: bool | None = None, mmap: bool = True):
        """kv_cache: the KV cache's type (runtime/engines.KV_CACHES). flash_attn: None turns llama.cpp's
        flash attention on exactly where the cache type needs it (see _make_context); True / False
        force it (benchmarks/bench_kv.py separates its effect from the cache type's)."""
        check_kv_cache(kv_cache)
        self.kv_cache, self.flash_attn = kv_cache, flash_attn
        llama_cpp = init_backend()
        self._c = llama_cpp
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        # llama.cpp can keep a repacked copy of the weights for its CPU kernels: faster decode on
        # AVX-512. With mmap the file's pages stay resident beside that copy (the weights held
        # twice); read without mmap (`mmap=False`) only the copy stays, but the weights are this
        # process's own instead of page cache shared with other processes on the same file.
        # Which to use per CPU: runtime/repack_choice.py (benchmarks/results/REPACK.md measures).
        # mmap=True keeps llama.cpp's default load mode (auto: mmap on a CPU).
        mparams.use_extra_bufts = bool(repack)
        if not mmap:  # llama.h's load_mode (no `use_mmap` field: a ctypes struct would take one silently)
            mparams.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE
        self.model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), mparams)
        if not self.model:
            raise BundleError(f"llama.cpp could not load {os.path.basename(gguf_path)} — "
                              "run `medgemma-edge verify` on the bundle, or export it again")
        self.threads = resolve_threads(threads)
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.model)
        self.n_swa = llama_cpp.llama_model_n_swa(self.model)  # sliding window (Gemma 3: 512 or 1024), 0 if none
        self.n_batch = max(n_batch or default_batch(n_gpu_layers != 0), 256)  # an image fits one micro-batch
        self.ctx = None
        self.loras: list = []  # llama_adapter_lora pointers, set on every context (load_loras)
        self._make_context(n_ctx)

    def _make_context(self, n_ctx: int) -> None:
        c = self._c
        if self.ctx:
            c.llama_free(self.ctx)
            self.ctx = None
        cparams = c.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = self.n_batch
        cparams.n_threads = cparams.n_threads_batch = self.threads
        # Flash attention off, as in llama-cpp-python's `Llama`: on CPU its f16 accumulation moved
        # Gemma 3 270M's logits by up to 1.2 against the unfused path, which is the one that matches
        # transformers. A quantized cache needs it on: llama.cpp stores V transposed without flash
        # attention and cannot quantize it so (llama_init_from_model refuses). What q8_0 and flash
        # attention each cost in faithfulness: benchmarks/results/KV_CACHE.md.
        cparams.type_k = cparams.type_v = getattr(c, f"GGML_TYPE_{self.kv_cache.upper()}")
        fa = self.kv_cache != "f16" if self.flash_attn is None else self.flash_attn
        cparams.flash_attn_type = c.LLAMA_FLASH_ATTN_TYPE_ENABLED if fa else c.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cparams.swa_full = True  # keeps sliding-window layers' cache whole, so a prefix can be reused
        self.ctx = c.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise BundleError(f"llama.cpp could not create a context of {n_ctx} tokens — "
                              "lower --context or free memory")
        self.n_ctx = c.llama_n_ctx(self.ctx)
        self._set_loras()
        self.active_threads = self.threads
        self.cached: list = []  # one key per evaluated position: a token id or ("img", digest, i)
        self._last_logits: np.ndarray | None = None
        self._rows: list | None = None  # eval_tokens(rows=True): the logits of each evaluated chunk
        self._swa_gap = 0  # positions before this lack their sliding-window layers' rows (load_state)

    def set_threads(self, n: int) -> None:
        """Threads for the next evaluations (prompt and decode), at most the configured count."""
        n = max(1, min(int(n), self.threads))
        if n != self.active_threads:
            self._c.llama_set_n_threads(self.ctx, n, n)
            self.active_threads = n

    def grow_context(self, needed: int, step: int = 2048) -> bool:
        """Re-create the context with room for `needed` tokens (the cache is lost); False if it cannot."""
        if needed <= self.n_ctx:
            return True
        if self.n_ctx_train and needed > self.n_ctx_train:
            return False
        self._make_context(min(-(-needed // step) * step, self.n_ctx_train or needed))
        return True

    # -- LoRA adapters -------------------------------------------------------------------------
    def load_loras(self, paths, base_config_sha256: str | None = None) -> list[dict]:
        """Apply llama.cpp LoRA GGUFs (`export SRC --adapter DIR --lora-out FILE`) at scale 1 to every
        evaluation; [{name, sha256 of the PEFT weights}] for each. A LoRA written by medgemma-edge
        names its base's config digest, refused unless it is `base_config_sha256`; for any other,
        llama.cpp's own test (architecture, tensor names and shapes) decides."""
        from medgemma_edge.runtime.backends import llama_logs

        c, loaded = self._c, []
        for path in paths:
            path = os.fspath(path)
            name = os.path.basename(path)
            if not os.path.isfile(path):
                raise InputError(f"LoRA file {name} not found — pass a .gguf written by "
                                 "`medgemma-edge export SRC --adapter DIR --lora-out FILE`")
            said: list[str] = []  # llama.cpp's error lines: why it refused the file

            def keep(level, text, said=said):
                if level == llama_logs.GGML_LOG_LEVEL_ERROR:
                    said.append(text.strip())

            with llama_logs.routed(keep):
                adapter = c.llama_adapter_lora_init(self.model, path.encode())
            if not adapter:
                why = next((t.split(": ", 1)[-1] for t in said if "lora" in t.lower() or "shape" in t), "")
                raise InputError(f"LoRA {name} does not fit this bundle's model ({why or 'llama.cpp refused it'}) "
                                 "— export the LoRA from the checkpoint this bundle was made from")
            base = self._lora_meta(adapter, "medgemma_edge.base.config_sha256")
            if base and base_config_sha256 and base != base_config_sha256:
                raise InputError(f"LoRA {name} was made for another base model than this bundle's "
                                 "(config digests differ) — export it from the bundle's own checkpoint")
            self.loras.append(adapter)
            loaded.append({"name": name, "sha256": self._lora_meta(adapter, "medgemma_edge.adapter.sha256")})
        self._set_loras()
        self.reset()  # cached positions were computed without these adapters
        return loaded

    def _lora_meta(self, adapter, key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = self._c.llama_adapter_meta_val_str(adapter, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def _set_loras(self) -> None:
        if not self.loras or not self.ctx:
            return
        c, n = self._c, len(self.loras)
        adapters = (c.llama_adapter_lora_p_ctypes * n)(*self.loras)
        scales = (ctypes.c_float * n)(*([1.0] * n))
        if c.llama_set_adapters_lora(self.ctx, adapters, n, scales) != 0:
            raise BundleError("llama.cpp could not apply the LoRA adapters to its context — free memory, "
                              "or load fewer adapters")

    # -- cache ---------------------------------------------------------------------------------
    @property
    def n_past(self) -> int:
        return len(self.cached)

    def sync_prefix(self, keys: list) -> int:
        """Drop the cached tail that differs from `keys`; return how many positions are kept.

        At least the last position is always evaluated again, so that fresh logits exist.
        """
        keep = 0
        for a, b in zip(self.cached, keys):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(keys) - 1)
        return self.truncate(keep)

    def truncate(self, keep: int) -> int:
        """Forget every cached position from `keep` on; return how many are kept."""
        if keep < len(self.cached):
            mem = self._c.llama_get_memory(self.ctx)
            # a position evaluated after `keep` sees, on sliding-window layers, the n_swa before it:
            # none of them may be one a restored state left out (load_state), or all must go
            unsafe = 0 < keep and self._swa_gap > 0 and keep - self.n_swa + 1 < self._swa_gap
            if unsafe or not self._c.llama_memory_seq_rm(mem, 0, keep, -1):
                self._c.llama_memory_clear(mem, True)
                keep = self._swa_gap = 0
            del self.cached[keep:]
            self._last_logits = None
        return keep

    def save_state(self) -> bytes:
        """The evaluated sequence (its KV cache) as bytes, to restore in another process."""
        c = self._c
        size = c.llama_state_seq_get_size(self.ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        written = c.llama_state_seq_get_data(self.ctx, buf, size, 0)
        return bytes(buf[:written])

    def load_state(self, data: bytes, keys: list) -> bool:
        """Replace the cache by a saved sequence whose positions are `keys`; False if llama.cpp
        refuses the bytes (another model or context shape), leaving the cache empty."""
        c = self._c
        self.reset()
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if not c.llama_state_seq_set_data(self.ctx, buf, len(data), 0):
            self.reset()
            return False
        self.cached = list(keys)
        self._last_logits = None
        # llama.cpp saves a sliding-window layer's last n_swa positions only (state_write_data skips
        # the cells its window masks): the ones before lack those layers' rows, so the cache may
        # grow from here, but not be cut back to keep them (truncate)
        self._swa_gap = max(0, len(keys) - self.n_swa) if self.n_swa else 0
        return True

    def reset(self) -> None:
        self._c.llama_memory_clear(self._c.llama_get_memory(self.ctx), True)
        self.cached.clear()
        self._last_logits = None
        self._swa_gap = 0

    def reserve(self, needed: int, *, grow: bool) -> None:
        """Make sure `needed` positions fit the context, growing it when allowed (up to the model's
        training length); InputError saying what to do otherwise."""
        if needed <= self.n_ctx or (grow and self.grow_context(needed)):
            return
        limit = self.n_ctx_train if grow else self.n_ctx
        raise InputError(f"the prompt needs {needed} tokens but the context holds {limit} — shorten the "
                         "question, use fewer images or slices" + ("" if grow else ", or raise --context"))

    # -- evaluation ----------------------------------------------------------------------------
    def eval_tokens(self, ids: list[int], *, rows: bool = False) -> None:
        """Evaluate token ids after the cache; logits of the last one become available, and with
        `rows` those of every one (logits_rows: teacher-forced comparisons)."""
        self.reserve(self.n_past + len(ids), grow=False)
        c = self._c
        self._rows = [] if rows else None
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start:start + self.n_batch]
            batch = c.llama_batch_init(len(chunk), 0, 1)
            try:
                batch.n_tokens = len(chunk)
                for i, tok in enumerate(chunk):
                    batch.token[i] = tok
                    batch.pos[i] = self.n_past + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = rows or start + i == len(ids) - 1
                self._decode(batch)
                if rows:
                    ptr = c.llama_get_logits(self.ctx)
                    self._rows.append(np.ctypeslib.as_array(ptr, shape=(len(chunk), self.n_vocab)).copy())
            finally:
                c.llama_batch_free(batch)
            self.cached.extend(chunk)
        self._last_logits = None

    def eval_embeddings(self, embd: np.ndarray, keys: list, *, bidirectional: bool = True) -> None:
        """Evaluate rows of input embeddings (n, n_embd) as one block; Gemma 3 images are bidirectional."""
        embd = np.ascontiguousarray(embd, dtype=np.float32)
        n = embd.shape[0]
        if embd.shape[1] != self.n_embd:
            raise BundleError(f"image embeddings have width {embd.shape[1]} but the text model "
                              f"expects {self.n_embd} — the vision file does not belong to this model")
        if n > self.n_batch:
            raise BundleError(f"an image of {n} tokens does not fit a batch of {self.n_batch}")
        self.reserve(self.n_past + n, grow=False)
        c = self._c
        batch = c.llama_batch_init(n, self.n_embd, 1)
        try:
            batch.n_tokens = n
            ctypes.memmove(batch.embd, embd.ctypes.data, embd.nbytes)
            for i in range(n):
                batch.pos[i] = self.n_past + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = False
            if bidirectional:
                c.llama_set_causal_attn(self.ctx, False)
            try:
                self._decode(batch)
            finally:
                if bidirectional:
                    c.llama_set_causal_attn(self.ctx, True)
        finally:
            c.llama_batch_free(batch)
        self.cached.extend(keys)
        self._last_logits = None

    def _decode(self, batch) -> None:
        rc = self._c.llama_decode(self.ctx, batch)
        if rc != 0:
            raise decode_error(rc, self.n_ctx)

    def logits(self) -> np.ndarray:
        """Logits (n_vocab,) after the last evaluated token, as float32 (a copy)."""
        if self._last_logits is None:
            ptr = self._c.llama_get_logits_ith(self.ctx, -1)
            self._last_logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()
        return self._last_logits

    def logits_rows(self) -> np.ndarray:
        """Logits (n, n_vocab) of every token of the last `eval_tokens(ids, rows=True)`, float32."""
        if not self._rows:
            raise MedGemmaEdgeError("no logit rows: evaluate with eval_tokens(ids, rows=True) first")
        return np.concatenate(self._rows)

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self._c.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self._c.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
