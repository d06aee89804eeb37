"""The vision GGUF ("mmproj"): SigLIP tower and Gemma 3 projector, as llama.cpp's clip loader reads it.

Keys are the ones llama.cpp's converter writes for Gemma3ForConditionalGeneration (clip.* with
projector type `gemma3`); image size, patch size and normalization come from the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import gguf

from medgemma_edge.export import gguf_stream
from medgemma_edge.export.checkpoint import Checkpoint
from medgemma_edge.export.config import VisionConfig
from medgemma_edge.export.gguf_tensors import FILE_TYPE

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ]  # "clip"
DEFAULT_POOL = 4  # llama.cpp assumes Gemma 3's 4x4 pooling unless told otherwise


def add_vision_hparams(w: gguf.GGUFWriter, cfg: VisionConfig, text_hidden: int) -> None:
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type(gguf.VisionProjectorType.GEMMA3)
    w.add_vision_projection_dim(text_hidden)
    w.add_vision_image_size(cfg.image_size)
    w.add_vision_patch_size(cfg.patch_size)
    w.add_vision_embedding_length(cfg.hidden_size)
    w.add_vision_feed_forward_length(cfg.intermediate_size)
    w.add_vision_block_count(cfg.num_hidden_layers)
    w.add_vision_head_count(cfg.num_attention_heads)
    w.add_vision_attention_layernorm_eps(cfg.layer_norm_eps)
    w.add_vision_image_mean(cfg.image_mean)
    w.add_vision_image_std(cfg.image_std)
    w.add_vision_use_gelu(True)  # SigLIP's gelu_pytorch_tanh
    if cfg.pool != DEFAULT_POOL:
        w.add_vision_projector_scale_factor(cfg.pool)


def write_vision_gguf(ckpt: Checkpoint, cfg: VisionConfig, text_hidden: int, out: Path, quant: str) -> Path:
    """Write the vision tower + projector at f32/f16/bf16/q8_0 to `out`, streaming the weights."""
    w = gguf.GGUFWriter(None, ARCH)
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_name(f"{ckpt.path.name} vision")
    w.add_file_type(FILE_TYPE[quant])
    if quant == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vision_hparams(w, cfg, text_hidden)
    parts = {k: v for k, v in ckpt.tensors.items() if k[0] in ("vision", "projector")}
    gguf_stream.write(w, out, gguf_stream.plan(parts, quant), desc=f"vision {quant}")
    return out
