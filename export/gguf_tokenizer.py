"""tokenizer.gguf: the vocabulary of an ONNX bundle, as a GGUF that holds no tensors.

An ONNX bundle's runtime must tokenize without torch or transformers. llama.cpp already
tokenizes the GGUF bundles exactly as transformers does (tests/test_export_gguf.py), so the ONNX
bundle carries the same tokenizer in the same form: the gemma3 header (llama.cpp reads the
architecture's hyperparameters even for a vocab-only load), the token list, scores, types,
special ids and chat template written by export/gguf_text.py's own functions — and zero tensors.
runtime/backends/llama_vocab.py opens it with `vocab_only=True`.
"""

from __future__ import annotations

from pathlib import Path

import gguf

from medgemma_edge.export.config import TextConfig
from medgemma_edge.export.gguf_text import ARCH, add_hparams, add_tokenizer
from medgemma_edge.export.vocab import Vocab

TOKENIZER_NAME = "tokenizer.gguf"


def write_tokenizer_gguf(cfg: TextConfig, vocab: Vocab, special: dict, chat_template: str, out: Path,
                         name: str = "tokenizer") -> Path:
    """Write the vocabulary-only GGUF to `out` (a few MB: 262k token strings and scores)."""
    w = gguf.GGUFWriter(None, ARCH)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    add_hparams(w, cfg)
    add_tokenizer(w, vocab, special, chat_template)
    w.write_header_to_file(Path(out))
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return Path(out)
