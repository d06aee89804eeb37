"""HF → GGUF tensor names, the one weight transform, and the storage type of each tensor.

The name tables are data: canonical checkpoint names (see export/checkpoint.py) on the left,
gguf-py's MODEL_TENSOR names on the right, so spelling follows llama.cpp's own constants.
Entries were checked against `gguf.get_tensor_name_map(MODEL_ARCH.GEMMA3 / MMPROJ)` (a test keeps
them in step) and against what llama.cpp's Gemma 3 text graph and clip loader read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import gguf
import numpy as np

from runtime.errors import ExportError

T = gguf.MODEL_TENSOR
Q = gguf.GGMLQuantizationType

# Transform kinds (applied in `transform`).
KEEP = "keep"
GEMMA_NORM = "gemma_norm"

# (part, HF name without .weight/.bias) → (GGUF tensor, transform)
NAME_TABLE: dict[tuple[str, str], tuple[gguf.MODEL_TENSOR, str]] = {
    # --- text decoder (Gemma 3) -------------------------------------------------------------
    ("text", "embed_tokens"): (T.TOKEN_EMBD, KEEP),
    ("text", "lm_head"): (T.OUTPUT, KEEP),  # only for untied checkpoints; MedGemma ties it
    ("text", "norm"): (T.OUTPUT_NORM, GEMMA_NORM),
    ("text", "layers.{bid}.input_layernorm"): (T.ATTN_NORM, GEMMA_NORM),
    ("text", "layers.{bid}.self_attn.q_proj"): (T.ATTN_Q, KEEP),
    ("text", "layers.{bid}.self_attn.k_proj"): (T.ATTN_K, KEEP),
    ("text", "layers.{bid}.self_attn.v_proj"): (T.ATTN_V, KEEP),
    ("text", "layers.{bid}.self_attn.o_proj"): (T.ATTN_OUT, KEEP),
    # q/k norms are Gemma RMSNorms too (applied per head before RoPE)
    ("text", "layers.{bid}.self_attn.q_norm"): (T.ATTN_Q_NORM, GEMMA_NORM),
    ("text", "layers.{bid}.self_attn.k_norm"): (T.ATTN_K_NORM, GEMMA_NORM),
    ("text", "layers.{bid}.post_attention_layernorm"): (T.ATTN_POST_NORM, GEMMA_NORM),
    ("text", "layers.{bid}.pre_feedforward_layernorm"): (T.FFN_PRE_NORM, GEMMA_NORM),  # blk.N.ffn_norm
    ("text", "layers.{bid}.post_feedforward_layernorm"): (T.FFN_POST_NORM, GEMMA_NORM),
    ("text", "layers.{bid}.mlp.gate_proj"): (T.FFN_GATE, KEEP),
    ("text", "layers.{bid}.mlp.up_proj"): (T.FFN_UP, KEEP),
    ("text", "layers.{bid}.mlp.down_proj"): (T.FFN_DOWN, KEEP),
    # --- vision tower (SigLIP): LayerNorms with weight and bias, used as stored ---------------
    ("vision", "embeddings.patch_embedding"): (T.V_ENC_EMBD_PATCH, KEEP),
    ("vision", "embeddings.position_embedding"): (T.V_ENC_EMBD_POS, KEEP),
    ("vision", "encoder.layers.{bid}.layer_norm1"): (T.V_ENC_INPUT_NORM, KEEP),  # v.blk.N.ln1
    ("vision", "encoder.layers.{bid}.self_attn.q_proj"): (T.V_ENC_ATTN_Q, KEEP),
    ("vision", "encoder.layers.{bid}.self_attn.k_proj"): (T.V_ENC_ATTN_K, KEEP),
    ("vision", "encoder.layers.{bid}.self_attn.v_proj"): (T.V_ENC_ATTN_V, KEEP),
    ("vision", "encoder.layers.{bid}.self_attn.out_proj"): (T.V_ENC_ATTN_O, KEEP),
    ("vision", "encoder.layers.{bid}.layer_norm2"): (T.V_ENC_POST_ATTN_NORM, KEEP),  # v.blk.N.ln2
    ("vision", "encoder.layers.{bid}.mlp.fc1"): (T.V_ENC_FFN_UP, KEEP),
    ("vision", "encoder.layers.{bid}.mlp.fc2"): (T.V_ENC_FFN_DOWN, KEEP),
    ("vision", "post_layernorm"): (T.V_POST_NORM, KEEP),
    # --- projector (Gemma): 4x4 avg-pool, Gemma RMSNorm, linear vision→text --------------------
    # stored as a bare parameter `mm_input_projection_weight`, hence the odd spelling
    ("projector", "mm_input_projection"): (T.V_MM_INP_PROJ, KEEP),
    ("projector", "mm_soft_emb_norm"): (T.V_MM_SOFT_EMB_NORM, GEMMA_NORM),
}


def transform(kind: str, rows: np.ndarray) -> np.ndarray:
    """Every weight change between a Hugging Face Gemma 3 checkpoint and llama.cpp, on float32 rows.

    - GEMMA_NORM: Gemma's RMSNorm computes `x * (1 + w)` and stores `w`; llama.cpp's RMSNorm
      computes `x * w`, so the stored weight gets +1. This covers every Gemma norm of the decoder
      (incl. q/k norms) and the projector's soft-embedding norm - not SigLIP's LayerNorms, which
      multiply by their weight as stored.
    - Linear weights need no transpose: torch stores (out, in) row-major, which gguf records as
      ne = [in, out], the layout ggml_mul_mat contracts over.
    - The patch-embedding conv (out, 3, 14, 14) needs no reshape either: read in reverse it is
      ggml's conv kernel layout [KW, KH, C_in, C_out].
    - `mm_input_projection_weight` is stored (vision_hidden, text_hidden), used as `x @ W` by
      transformers; llama.cpp's Gemma 3 projector transposes it in its graph, so it is kept as is.
    - The output head is tied to the embedding: no `output.weight` is written and llama.cpp reuses
      `token_embd` (see checkpoint.open_checkpoint).
    """
    if kind == GEMMA_NORM:
        return rows + np.float32(1.0)
    if kind == KEEP:
        return rows
    raise ValueError(f"unknown transform {kind!r}")


@dataclass(frozen=True)
class Mapped:
    gguf_name: str  # e.g. "blk.3.attn_q.weight"
    kind: str  # transform kind


def _compile() -> list[tuple[str, re.Pattern, gguf.MODEL_TENSOR, str]]:
    out = []
    for (part, hf), (tensor, kind) in NAME_TABLE.items():
        pattern = re.escape(hf).replace(re.escape("{bid}"), r"(?P<bid>\d+)")
        # checkpoints spell the suffix `.weight`/`.bias`; the projector's bare parameter `_weight`
        out.append((part, re.compile(pattern + r"(?P<suffix>\.weight|\.bias|_weight)$"), tensor, kind))
    return out


_PATTERNS = _compile()


def map_name(part: str, hf_name: str) -> Mapped:
    """GGUF name and transform for one canonical checkpoint tensor; ExportError if unknown."""
    for p, regex, tensor, kind in _PATTERNS:
        m = regex.fullmatch(hf_name) if p == part else None
        if m:
            bid = m.groupdict().get("bid")
            base = gguf.TENSOR_NAMES[tensor].format(bid=int(bid) if bid is not None else None)
            suffix = ".bias" if m["suffix"] == ".bias" else ".weight"
            return Mapped(base + suffix, kind)
    raise ExportError(f"no GGUF name for {part} tensor {hf_name!r}; this Gemma 3 variant is not supported")


# --- storage types ----------------------------------------------------------------------------

TEXT_QUANTS = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")
K_QUANTS = ("q6_k", "q5_k_m", "q4_k_m")
VISION_QUANTS = ("f32", "f16", "q8_0", "onnx-f32", "onnx-int8")  # onnx-*: export/onnx_vision.py
# What gguf-py writes itself; K-quants come from llama.cpp's quantizer (export/quantize.py).
DIRECT = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
FILE_TYPE = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


def storage_type(gguf_name: str, shape: tuple[int, ...], quant: str) -> gguf.GGMLQuantizationType:
    """The GGML type one tensor is written in, for a requested quantization of its file."""
    if quant not in DIRECT:
        raise ExportError(f"gguf-py cannot write {quant!r} directly; use one of {sorted(DIRECT)}")
    if len(shape) == 1:
        return Q.F32  # norms and biases: tiny, and ggml's elementwise ops want them in F32
    if gguf_name.startswith(("v.patch_embd", "v.position_embd")):
        # small, and every image passes through them; llama.cpp's own converter keeps them F32
        # for Gemma 3 (llama.cpp issue 13025)
        return Q.F32
    want = DIRECT[quant]
    if gguf_name.startswith("mm.input_projection") and want not in (Q.F32, Q.F16):
        return Q.F16  # a Q8_0 projector has broken Gemma 3 images before (llama.cpp issue 13025)
    if want == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] != 0:
        return Q.F16  # rows not a whole number of 32-value blocks
    return want


def stored_nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
    return int(np.prod(byte_shape))


def encode(rows: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """float32 rows → bytes-compatible array in the given GGML type."""
    return gguf.quants.quantize(np.ascontiguousarray(rows, dtype=np.float32), qtype)
