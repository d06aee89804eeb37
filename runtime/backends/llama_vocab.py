"""llama.cpp's tokenizer, on its own: the vocabulary of an ONNX bundle (tokenizer.gguf, no weights).

`LlamaTokenizing` holds the four vocabulary calls every engine offers (tokenize, piece, end_ids,
is_end); LlamaEngine gets them from its full model, `LlamaVocab` from a GGUF loaded with
`vocab_only=True` (export/gguf_tokenizer.py writes one). One implementation, so an ONNX bundle
tokenizes, detokenizes and stops exactly as a GGUF bundle of the same checkpoint does.
"""

from __future__ import annotations

import ctypes
import os

from medgemma_edge.runtime.backends import llama_logs
from medgemma_edge.runtime.errors import BundleError

_BACKEND_READY = False


def init_backend():
    """llama_cpp, with its backend initialised once per process and its logs cut to errors."""
    global _BACKEND_READY
    import llama_cpp

    if not _BACKEND_READY:
        llama_logs.install()  # error lines (why a load failed) stay visible; the tensor chatter goes
        llama_cpp.llama_backend_init()
        _BACKEND_READY = True
    return llama_cpp


class LlamaTokenizing:
    """Vocabulary calls on `self._c` (llama_cpp) and `self.vocab` (a llama_vocab pointer)."""

    _c = None
    vocab = None

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


class LlamaVocab(LlamaTokenizing):
    """The tokenizer of a GGUF file without its weights (only the vocabulary is read: small, quick to load)."""

    def __init__(self, path):
        c = init_backend()
        self._c = c
        params = c.llama_model_default_params()
        params.vocab_only = True
        self.model = c.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise BundleError(f"llama.cpp could not read the tokenizer {os.path.basename(path)} — "
                              "run `medgemma-edge verify` on the bundle, or export it again")
        self.vocab = c.llama_model_get_vocab(self.model)
        self.n_vocab = c.llama_vocab_n_tokens(self.vocab)

    def close(self) -> None:
        if getattr(self, "model", None):
            self._c.llama_model_free(self.model)
            self.model = None
            self.vocab = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
