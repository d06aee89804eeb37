"""The text GGUF: Gemma 3 decoder weights, hyperparameters, tokenizer and chat template."""

from __future__ import annotations

from pathlib import Path

import gguf

from medgemma_edge.export import gguf_stream
from medgemma_edge.export.checkpoint import Checkpoint
from medgemma_edge.export.config import TextConfig
from medgemma_edge.export.gguf_tensors import FILE_TYPE
from medgemma_edge.export.vocab import Vocab

ARCH = "gemma3"


def add_hparams(w: gguf.GGUFWriter, cfg: TextConfig) -> None:
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)  # global layers
    w.add_rope_freq_base_swa(cfg.rope_local_base_freq)  # sliding layers
    factor = cfg.linear_rope_factor()
    if factor is not None:  # applies to global layers only, as in transformers
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    w.add_sliding_window(cfg.sliding_window)
    # Which layers slide. llama.cpp (0.3.36) reads this array; without it it assumes 5 sliding :
    # 1 global (MedGemma's own rhythm), and a model with another rhythm loses parity.
    w.add_sliding_window_pattern(cfg.sliding_layers())


def add_tokenizer(w: gguf.GGUFWriter, vocab: Vocab, special: dict, chat_template: str) -> None:
    w.add_tokenizer_model("llama")  # sentencepiece-style BPE driven by scores
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    w.add_bos_token_id(special["bos"])
    w.add_eos_token_id(special["eos"])
    w.add_eot_token_id(special["end_of_turn"])  # chat turns end here, not at <eos>
    if special.get("pad") is not None:
        w.add_pad_token_id(special["pad"])
    unk = vocab.id_of("<unk>")
    if unk is not None:
        w.add_unk_token_id(unk)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)  # Gemma does not prepend a space
    # llama-cpp-python's multimodal chat handler refuses a model without one
    w.add_chat_template(chat_template)


def write_text_gguf(ckpt: Checkpoint, cfg: TextConfig, vocab: Vocab, special: dict, chat_template: str,
                    out: Path, quant: str) -> Path:
    """Write the decoder at a gguf-py type (f32/f16/bf16/q8_0) to `out`, streaming the weights."""
    w = gguf.GGUFWriter(None, ARCH)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(ckpt.path.name)
    w.add_file_type(FILE_TYPE[quant])
    if quant == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hparams(w, cfg)
    add_tokenizer(w, vocab, special, chat_template)
    planned = gguf_stream.plan({k: v for k, v in ckpt.tensors.items() if k[0] == "text"}, quant)
    gguf_stream.write(w, out, planned, desc=f"text {quant}")
    return out
