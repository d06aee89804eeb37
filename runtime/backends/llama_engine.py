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

from medgemma_edge.runtime.backends import llama_logs
from medgemma_edge.runtime.errors import BundleError, InputError, MedGemmaEdgeError
from medgemma_edge.runtime.machine import resolve_threads

_BACKEND_READY = False


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


class LlamaEngine:
    """One model, one context, one sequence. Positions are counted from 0 for the whole cache."""

    def __init__(self, gguf_path: str, *, n_ctx: int = 4096, threads: int | None = None,
                 n_gpu_layers: int = 0, n_batch: int | None = None, repack: bool = False):
        global _BACKEND_READY
        import llama_cpp

        self._c = llama_cpp
        if not _BACKEND_READY:
            llama_logs.install()  # error lines (why a load failed) stay visible; the tensor chatter goes
            llama_cpp.llama_backend_init()
            _BACKEND_READY = True
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        # llama.cpp can keep a second, repacked copy of the weights for its CPU kernels. Measured at
        # MedGemma 4B q4_k_m, 2 threads: AVX-512 VNNI EPYC decode 10.2 → 11.9 tok/s (+17 %), but
        # peak RSS 2.6 → 4.1 GB for the text model alone (+1.46 GB; with the f16 vision tower the
        # default path would pass 4.5 GB) and load 0.7 → 2.2 s; on AVX2 it bought no decode speed.
        # Memory wins by default (clinic machines with 8 GB); `repack=True` asks for the speed.
        mparams.use_extra_bufts = bool(repack)
        self.model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), mparams)
        if not self.model:
            raise BundleError(f"llama.cpp could not load {os.path.basename(gguf_path)} — "
                              "run `medgemma-edge verify` on the bundle, or export it again")
        self.threads = resolve_threads(threads)
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.model)
        self.n_batch = max(n_batch or default_batch(n_gpu_layers != 0), 256)  # an image fits one micro-batch
        self.ctx = None
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
        # Off, as in llama-cpp-python's `Llama`: on CPU its f16 accumulation moved Gemma 3 270M's
        # logits by up to 1.2 against the unfused path, which is the one that matches transformers.
        cparams.flash_attn_type = c.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cparams.swa_full = True  # keeps sliding-window layers' cache whole, so a prefix can be reused
        self.ctx = c.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise BundleError(f"llama.cpp could not create a context of {n_ctx} tokens — "
                              "lower --context or free memory")
        self.n_ctx = c.llama_n_ctx(self.ctx)
        self.active_threads = self.threads
        self.cached: list = []  # one key per evaluated position: a token id or ("img", digest, i)
        self._last_logits: np.ndarray | None = None

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

    # -- text ----------------------------------------------------------------------------------
    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        raw = text.encode("utf-8")
        cap = len(raw) + 16
        buf = (self._c.llama_token * cap)()
        n = self._c.llama_tokenize(self.vocab, raw, len(raw), buf, cap, False, special)
        if n < 0:
            buf = (self._c.llama_token * -n)()
            n = self._c.llama_tokenize(self.vocab, raw, len(raw), buf, -n, False, special)
        return list(buf[:n])

    def end_ids(self) -> set[int]:
        """The vocabulary's end-of-sequence and end-of-turn ids (as recorded in the GGUF)."""
        c = self._c
        return {t for t in (c.llama_vocab_eos(self.vocab), c.llama_vocab_eot(self.vocab)) if t >= 0}

    def is_end(self, token: int) -> bool:
        """llama.cpp's end-of-generation test (eos, eot and tokens it knows end a turn by their text)."""
        return bool(self._c.llama_vocab_is_eog(self.vocab, token))

    def piece(self, token: int, *, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._c.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._c.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

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
            if not self._c.llama_memory_seq_rm(mem, 0, keep, -1):
                self._c.llama_memory_clear(mem, True)
                keep = 0
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
        return True

    def reset(self) -> None:
        self._c.llama_memory_clear(self._c.llama_get_memory(self.ctx), True)
        self.cached.clear()
        self._last_logits = None

    def reserve(self, needed: int, *, grow: bool) -> None:
        """Make sure `needed` positions fit the context, growing it when allowed (up to the model's
        training length); InputError saying what to do otherwise."""
        if needed <= self.n_ctx or (grow and self.grow_context(needed)):
            return
        limit = self.n_ctx_train if grow else self.n_ctx
        raise InputError(f"the prompt needs {needed} tokens but the context holds {limit} — shorten the "
                         "question, use fewer images or slices" + ("" if grow else ", or raise --context"))

    # -- evaluation ----------------------------------------------------------------------------
    def eval_tokens(self, ids: list[int]) -> None:
        """Evaluate token ids after the cache; logits of the last one become available."""
        self.reserve(self.n_past + len(ids), grow=False)
        c = self._c
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
                    batch.logits[i] = start + i == len(ids) - 1
                self._decode(batch)
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
