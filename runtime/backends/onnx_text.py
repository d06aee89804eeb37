"""Gemma 3's text decoder through onnxruntime, with the KV cache held here: the ONNX twin of
runtime/backends/llama_engine.LlamaEngine (same methods, so prefill/generate/Model drive either).

    OnnxTextEngine(decoder_path, info: dict, table, vocab, *, n_ctx: int, threads: int | None,
                   providers=("CPUExecutionProvider",))

info: the manifest entry export.onnx_decoder.export_decoder returned. table: an object with
`rows(ids) -> float32 (n, hidden)` (runtime/backends/onnx_embeddings.EmbeddingTable). vocab: the
bundle's vocabulary (tokenize / piece / end_ids / is_end are delegated to it).

The graph (export/onnx_decoder.py) takes input embeddings and an additive attention bias per layer
type; this engine builds both. Token rows are multiplied by sqrt(hidden) (as transformers'
Gemma3TextScaledWordEmbedding does), image rows are used as given. The bias says which cached
positions a new position sees: earlier ones (causal), on sliding layers only the last `window`
of them, and on every layer all positions of its own image block (Gemma 3 lets an image's tokens
see each other both ways; transformers' token_type_ids mask). One `keys` entry per position, as
in LlamaEngine: a token id, or ("img", digest, j) for the j-th row of an image block.

KV cache: one float32 buffer [1, kv_heads, capacity, head_dim] per layer and per K/V, grown in
KV_CHUNK steps up to n_ctx. With IO binding the graph writes the new rows in place (onnxruntime's
GroupQueryAttention shares past and present when they are the same buffer), so a decode step
copies nothing. On CUDA (CUDAExecutionProvider first in `providers`) the buffers live on the GPU
and are allocated for the whole context at once (growing copies through the host); whether the
CUDA GroupQueryAttention takes `attention_bias` with full-length caches is untested here — its
kernel rejects it with windowed caches (see /work/shared/REFERENCE.md).
"""

from __future__ import annotations

import io
import json
import math
import os

import numpy as np

from medgemma_edge.runtime.errors import BundleError, InputError, MedGemmaEdgeError
from medgemma_edge.runtime.machine import resolve_threads

KV_CHUNK = 1024  # positions added to the cache buffers at a time
N_BATCH = 512  # prompt tokens per evaluation: the bias is (S, total) floats
CONTEXT_STEP = 2048  # growth of n_ctx under reserve(grow=True), as LlamaEngine
MASKED = np.finfo(np.float32).min  # transformers' masked score


def attention_bias(blocks: np.ndarray, start: int, n: int, window: int | None) -> np.ndarray:
    """Additive bias (1, 1, n, start + n) for queries start..start+n-1 over keys 0..start+n-1.

    blocks: image block number per position (-1: text). window: sliding layers' window, None for
    global layers. Rules as transformers' Gemma 3 masks: (causal and within the window) or both
    in the same image block.
    """
    total = start + n
    q = np.arange(start, total)[:, None]  # (n, 1)
    k = np.arange(total)[None, :]  # (1, total)
    seen = k <= q
    if window:
        seen &= q - k < window
    bq, bk = blocks[start:total, None], blocks[None, :total]
    seen |= (bq >= 0) & (bq == bk)
    return np.where(seen, np.float32(0), MASKED).astype(np.float32)[None, None]


class _KVCache:
    """Per layer K and V buffers (1, kv_heads, capacity, head_dim) as OrtValues; `device` "cpu"
    keeps them as numpy arrays the OrtValues wrap, "cuda" on the GPU."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, device: str):
        self.layers, self.kv_heads, self.head_dim, self.device = layers, kv_heads, head_dim, device
        self.capacity = 0
        self.values: list = []  # [k0, v0, k1, v1, ...] OrtValues

    def ensure(self, total: int, limit: int, keep: int) -> None:
        """Room for `total` positions (at most `limit`), keeping the first `keep`."""
        if total <= self.capacity:
            return
        cap = min(limit, -(-total // KV_CHUNK) * KV_CHUNK) if self.device == "cpu" else limit
        old = self.arrays(keep) if keep else None
        self._allocate(max(cap, total))
        if old is not None:
            self.load(old)

    def _allocate(self, cap: int) -> None:
        import onnxruntime as ort

        shape = (1, self.kv_heads, cap, self.head_dim)
        if self.device == "cpu":
            self._host = [np.zeros(shape, np.float32) for _ in range(2 * self.layers)]
            self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._host]
        else:
            self._host = None
            self.values = [ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, "cuda", 0)
                           for _ in range(2 * self.layers)]
        self.capacity = cap

    def arrays(self, n: int) -> list[np.ndarray]:
        """Copies of the first n positions: [k0, v0, k1, v1, ...] each (1, kv_heads, n, head_dim)."""
        host = self._host if self._host is not None else [v.numpy() for v in self.values]
        return [np.ascontiguousarray(a[:, :, :n]) for a in host]

    def load(self, arrays: list[np.ndarray]) -> None:
        n = arrays[0].shape[2]
        if self._host is not None:
            for dst, src in zip(self._host, arrays):
                dst[:, :, :n] = src
        else:  # CUDA: through the host, rare (growth, a restored prefix)
            import onnxruntime as ort

            full = [v.numpy() for v in self.values]
            for dst, src in zip(full, arrays):
                dst[:, :, :n] = src
            self.values = [ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0) for a in full]


class OnnxTextEngine:
    """One decoder session, one sequence. Positions are counted from 0 for the whole cache."""

    def __init__(self, decoder_path, info: dict, table, vocab, *, n_ctx: int = 4096, threads: int | None = None,
                 providers=("CPUExecutionProvider",)):
        import onnxruntime as ort

        self.info, self.table, self.vocab = info, table, vocab
        self.threads = self.active_threads = resolve_threads(threads)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(str(decoder_path), opts, providers=list(providers))
        except Exception as err:
            raise BundleError(f"onnxruntime could not load the decoder {os.path.basename(str(decoder_path))} "
                              f"({type(err).__name__}: {str(err)[:200]}) — run `medgemma-edge verify` on "
                              "the bundle, or export it again") from None
        self.device = "cuda" if "CUDAExecutionProvider" in self._session.get_providers() else "cpu"
        self.layers, self.n_embd, self.n_vocab = int(info["layers"]), int(info["hidden"]), int(info["vocab"])
        self.n_ctx_train = int(info.get("max_positions") or 0)
        self.n_ctx = int(n_ctx)
        self.window = int(info.get("sliding_window") or 0) or None
        self.bias_inputs = dict(info.get("attention_bias") or {})  # {"sliding": name, "full": name}
        # transformers multiplies by the scale as a float32 tensor (cast to the weights' dtype, f32 here)
        self.embed_scale = np.float32(info.get("embed_scale") or math.sqrt(self.n_embd))
        self._kv = _KVCache(self.layers, int(info["kv_heads"]), int(info["head_dim"]), self.device)
        self.cached: list = []
        self._blocks = np.zeros(0, np.int64)
        self._rows: np.ndarray | None = None  # the last evaluation's logits, one row a position

    # -- text: the vocabulary's ------------------------------------------------------------------
    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        return self.vocab.tokenize(text, special=special)

    def piece(self, token: int, *, special: bool = False) -> bytes:
        return self.vocab.piece(token, special=special)

    def end_ids(self) -> set[int]:
        return self.vocab.end_ids()

    def is_end(self, token: int) -> bool:
        return self.vocab.is_end(token)

    def set_threads(self, n: int) -> None:
        """Recorded only: onnxruntime fixes a session's thread pool when it is created."""
        self.active_threads = max(1, min(int(n), self.threads))

    # -- cache -------------------------------------------------------------------------------------
    @property
    def n_past(self) -> int:
        return len(self.cached)

    def sync_prefix(self, keys: list) -> int:
        """Drop the cached tail that differs from `keys`; return how many positions are kept (at
        least the last position is evaluated again, so that fresh logits exist)."""
        keep = 0
        for a, b in zip(self.cached, keys):
            if a != b:
                break
            keep += 1
        return self.truncate(min(keep, len(keys) - 1))

    def truncate(self, keep: int) -> int:
        """Forget every cached position from `keep` on (the buffers' tail is simply overwritten)."""
        keep = max(0, keep)
        if keep < len(self.cached):
            del self.cached[keep:]
            self._blocks = self._blocks[:keep]
            self._rows = None
        return len(self.cached)

    def reset(self) -> None:
        self.truncate(0)

    def reserve(self, needed: int, *, grow: bool) -> None:
        """Make sure `needed` positions fit the context, growing it when allowed (up to the model's
        training length); InputError saying what to do otherwise. Memory follows use, not n_ctx."""
        if needed <= self.n_ctx:
            return
        if grow and (not self.n_ctx_train or needed <= self.n_ctx_train):
            step = -(-needed // CONTEXT_STEP) * CONTEXT_STEP
            self.n_ctx = min(step, self.n_ctx_train) if self.n_ctx_train else step
            return
        limit = self.n_ctx_train if grow else self.n_ctx
        raise InputError(f"the prompt needs {needed} tokens but the context holds {limit} — shorten the "
                         "question, use fewer images or slices" + ("" if grow else ", or raise --context"))

    def save_state(self) -> bytes:
        """The evaluated sequence (KV cache, keys, image blocks) as .npz bytes; no pickles."""
        buf = io.BytesIO()
        keys = json.dumps([list(k) if isinstance(k, tuple) else k for k in self.cached]).encode()
        arrays = {f"kv{i}": a for i, a in enumerate(self._kv.arrays(self.n_past))} if self.n_past else {}
        np.savez(buf, keys=np.frombuffer(keys, np.uint8), blocks=self._blocks, **arrays)
        return buf.getvalue()

    def load_state(self, data: bytes, keys: list) -> bool:
        """Replace the cache by a saved sequence whose positions are `keys`; False (cache empty)
        when the bytes are not a state of this model for exactly these keys."""
        self.reset()
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                saved = [tuple(k) if isinstance(k, list) else k for k in json.loads(z["keys"].tobytes())]
                blocks = z["blocks"]
                kv = [z[f"kv{i}"] for i in range(2 * self.layers)] if saved else []
        except (ValueError, KeyError, OSError, TypeError):
            return False
        n = len(saved)
        want = (1, self._kv.kv_heads, n, self._kv.head_dim)
        if saved != list(keys) or len(blocks) != n or any(a.shape != want or a.dtype != np.float32 for a in kv):
            return False
        if n > self.n_ctx:
            return False
        if n:
            self._kv.ensure(n, self.n_ctx, 0)
            self._kv.load(kv)
        self.cached, self._blocks = list(saved), blocks.astype(np.int64)
        return True

    # -- evaluation --------------------------------------------------------------------------------
    def eval_tokens(self, ids: list[int]) -> None:
        """Evaluate token ids after the cache; logits of the last one become available."""
        self.reserve(self.n_past + len(ids), grow=False)
        for start in range(0, len(ids), N_BATCH):
            chunk = list(ids[start:start + N_BATCH])
            embd = self.table.rows(chunk) * self.embed_scale  # (n, hidden) f32
            self._run(embd, chunk, np.full(len(chunk), -1, np.int64))

    def eval_embeddings(self, embd: np.ndarray, keys: list, *, bidirectional: bool = True) -> None:
        """Evaluate rows of input embeddings (n, n_embd) as one block; Gemma 3 images are bidirectional."""
        embd = np.ascontiguousarray(embd, dtype=np.float32)
        if embd.ndim != 2 or embd.shape[1] != self.n_embd:
            raise BundleError(f"image embeddings have shape {embd.shape} but the text model expects "
                              f"(n, {self.n_embd}) — the vision file does not belong to this model")
        if len(keys) != len(embd):
            raise InputError(f"{len(embd)} embedding rows but {len(keys)} keys")
        self.reserve(self.n_past + len(embd), grow=False)
        if bidirectional:
            first = int(self._blocks.max(initial=-1)) + 1
            blocks = np.full(len(keys), first, np.int64)
        else:
            blocks = np.full(len(keys), -1, np.int64)
        self._run(embd, list(keys), blocks)

    def _run(self, embd: np.ndarray, keys: list, blocks: np.ndarray) -> None:
        start, n = self.n_past, len(embd)
        total = start + n
        self._kv.ensure(total, self.n_ctx, start)
        all_blocks = np.concatenate([self._blocks, blocks])
        feeds = {"inputs_embeds": embd[None], "attention_mask": np.ones((1, total), np.int64)}
        for kind, name in self.bias_inputs.items():
            feeds[name] = attention_bias(all_blocks, start, n, self.window if kind == "sliding" else None)
        binding = self._session.io_binding()
        binding.bind_output("logits", "cpu")  # first: get_outputs() follows the binding order
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for i, value in enumerate(self._kv.values):
            layer, part = divmod(i, 2)
            kind = ("key", "value")[part]
            binding.bind_ortvalue_input(f"past_key_values.{layer}.{kind}", value)
            binding.bind_ortvalue_output(f"present.{layer}.{kind}", value)  # written in place
        try:
            self._session.run_with_iobinding(binding)
        except Exception as err:
            raise MedGemmaEdgeError(f"onnxruntime failed to evaluate {n} positions after {start} "
                                    f"({type(err).__name__}: {str(err)[:200]}) — often for lack of memory: "
                                    "close other programs or use a smaller --context") from None
        self._rows = binding.get_outputs()[0].numpy()[0]  # every position's where the graph keeps them
        self.cached.extend(keys)
        self._blocks = all_blocks

    def logits_rows(self) -> np.ndarray:
        """Logits of the positions of the last evaluation (n, n_vocab): one row from a graph whose LM
        head sees the last position only (the bundle's), all rows from one built without pruning."""
        if self._rows is None:
            raise MedGemmaEdgeError("no logits: nothing was evaluated since the cache last changed")
        return self._rows

    def logits(self) -> np.ndarray:
        """Logits (n_vocab,) after the last evaluated position, as float32."""
        return self.logits_rows()[-1]

    def close(self) -> None:
        self._session = None
        self._kv = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
