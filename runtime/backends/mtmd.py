"""Image → embeddings through llama.cpp's mtmd library (the bundle's vision GGUF).

A thin ctypes layer over `llama_cpp.mtmd_cpp`. It only encodes: the caller hands an S×S RGB
image already at the model's size (so mtmd's own resize is the identity, see runtime/preprocess)
and gets the projected embeddings, which it places into the decoder itself.
"""

from __future__ import annotations

import ctypes
import os
import numpy as np

from medgemma_edge.runtime.backends import llama_logs
from medgemma_edge.runtime.machine import resolve_threads
from medgemma_edge.runtime.errors import BundleError, InputError

class VisionEncoder:
    """The vision tower + projector of one bundle, bound to the text model it feeds."""

    def __init__(self, mmproj_path: str, llama_model_ptr, threads: int = 0, flash_attn: int = -1):
        from llama_cpp import llama_cpp as llama
        from llama_cpp import mtmd_cpp

        self._m, self._model = mtmd_cpp, llama_model_ptr
        llama_logs.install()
        params = mtmd_cpp.mtmd_context_params_default()
        params.n_threads = resolve_threads(threads)
        params.print_timings = False
        params.flash_attn_type = int(flash_attn)  # -1 auto (llama.cpp decides per device), 0 off, 1 on
        params.warmup = False  # a warm-up encode costs as much as a real one; the first image pays once
        self._ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj_path).encode(), llama_model_ptr, params)
        if not self._ctx:
            raise BundleError(f"llama.cpp could not load the vision file {os.path.basename(mmproj_path)} — "
                              "run `medgemma-edge verify` on the bundle, or export it again")
        if not mtmd_cpp.mtmd_support_vision(self._ctx):
            self.close()
            raise BundleError(f"{os.path.basename(mmproj_path)} has no vision encoder — export the bundle again")
        self.n_embd = int(llama.llama_model_n_embd(llama_model_ptr))
        if self.n_embd <= 0:  # e.g. a vocab-only load
            self.close()
            raise BundleError("the text model was loaded without its weights; load it fully before images")
        self._marker = mtmd_cpp.mtmd_default_marker()

    def encode(self, rgb_uint8: np.ndarray) -> np.ndarray:
        """Embeddings (n_tokens, n_embd) float32 for one (S, S, 3) uint8 RGB image."""
        m = self._m
        if self._ctx is None:
            raise RuntimeError("VisionEncoder is closed")
        img = np.ascontiguousarray(rgb_uint8)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise InputError(f"expected an (S, S, 3) uint8 RGB image, got {img.dtype} {img.shape}")
        h, w = img.shape[:2]
        bitmap = m.mtmd_bitmap_init(w, h, img.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        chunks = m.mtmd_input_chunks_init()
        try:
            # mtmd tokenizes a prompt: the marker stands for the image; the text around it is ignored
            text = m.mtmd_input_text(self._marker, len(self._marker), False, True)
            bitmaps = (m.mtmd_bitmap_p_ctypes * 1)(bitmap)
            rc = m.mtmd_tokenize(self._ctx, chunks, ctypes.byref(text), bitmaps, 1)
            if rc != 0:
                raise BundleError(f"mtmd could not take the image (code {rc}) — export the bundle again")
            chunk = self._image_chunk(chunks)
            n_tokens = int(m.mtmd_input_chunk_get_n_tokens(chunk))
            if m.mtmd_encode_chunk(self._ctx, chunk) != 0:
                raise BundleError("the vision model failed to encode the image — export the bundle again")
            out = m.mtmd_get_output_embd(self._ctx)
            return np.ctypeslib.as_array(out, shape=(n_tokens * self.n_embd,)).reshape(n_tokens, self.n_embd).copy()
        finally:
            m.mtmd_input_chunks_free(chunks)
            m.mtmd_bitmap_free(bitmap)

    def _image_chunk(self, chunks):
        m = self._m
        for i in range(m.mtmd_input_chunks_size(chunks)):
            chunk = m.mtmd_input_chunks_get(chunks, i)
            if m.mtmd_input_chunk_get_type(chunk) == m.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                return chunk
        raise BundleError("mtmd produced no image chunk — the vision file does not match the text model")

    def close(self) -> None:
        if self._ctx is not None:
            self._m.mtmd_free(self._ctx)
            self._ctx = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
