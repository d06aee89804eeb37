"""Small GGUF files with chosen headers, for the import's refusals (gguf-py writes them)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
          "<end_of_image>", "<image_soft_token>", "hello", "world"]


def text_gguf(path: Path, *, arch: str = "gemma3", n_embd: int = 256, general_type: str | None = None,
              ollama_fused: bool = False, tokens=TOKENS, split: int = 0) -> Path:
    """A header-complete Gemma 3 text GGUF (tiny tensors: llama.cpp would not run it). With
    ollama_fused, the vision tower inside it as Ollama's convert/convert_gemma3.go writes gemma3."""
    w = gguf.GGUFWriter(str(path), arch)
    if general_type:
        w.add_type(general_type)
    if split:
        w.add_uint16("split.count", split)
    w.add_uint32(f"{arch}.embedding_length", n_embd)
    w.add_uint32(f"{arch}.block_count", 1)
    w.add_uint32(f"{arch}.context_length", 8192)
    w.add_tokenizer_model("llama")
    w.add_token_list(list(tokens))
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), n_embd), np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((n_embd, n_embd), np.float32))
    if ollama_fused:
        for key, value in (("block_count", 1), ("embedding_length", 64), ("feed_forward_length", 128),
                           ("image_size", 896), ("patch_size", 14), ("attention.head_count", 2)):
            w.add_uint32(f"gemma3.vision.{key}", value)
        w.add_uint32("gemma3.mm.tokens_per_image", 256)
        w.add_tensor("v.patch_embedding.weight", np.zeros((64, 3, 14, 14), np.float32))
        w.add_tensor("v.blk.0.attn_q.weight", np.zeros((64, 64), np.float32))
        w.add_tensor("mm.mm_input_projection.weight", np.zeros((64, n_embd), np.float32))
        w.add_tensor("mm.mm_soft_emb_norm.weight", np.zeros((64,), np.float32))
    _finish(w)
    return path


def projector_gguf(path: Path, *, projector: str = "gemma3", projection_dim: int = 256, image_size: int = 896,
                   patch_size: int = 14, arch: str = "clip") -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type("mmproj")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", projector)
    w.add_uint32("clip.vision.projection_dim", projection_dim)
    w.add_uint32("clip.vision.image_size", image_size)
    w.add_uint32("clip.vision.patch_size", patch_size)
    w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    w.add_tensor("mm.input_projection.weight", np.zeros((8, projection_dim), np.float32))
    _finish(w)
    return path


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
