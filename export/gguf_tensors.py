"""HF → GGUF tensor names, the one weight transform, and the storage type of each tensor.

The names come from gguf-py's own `TensorNameMap` (llama.cpp's converter uses the same tables):
a canonical checkpoint name (see export/checkpoint.py) with its part's Hugging Face prefix is
looked up there, giving a MODEL_TENSOR and its GGUF spelling. What is ours is data: which tensor
kinds a Gemma 3 / MedGemma checkpoint may hold (anything else is refused, so an unknown variant
fails at export, not at load) and which transform each one needs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import gguf
import numpy as np

from medgemma_edge.runtime.errors import ExportError

T = gguf.MODEL_TENSOR
Q = gguf.GGMLQuantizationType

# Transform kinds (applied in `transform`).
KEEP = "keep"
GEMMA_NORM = "gemma_norm"

# part → (gguf-py architecture of its name map, the Hugging Face prefix its canonical names drop)
PARTS = {"text": (gguf.MODEL_ARCH.GEMMA3, "model."),
         "vision": (gguf.MODEL_ARCH.MMPROJ, "vision_tower.vision_model."),
         "projector": (gguf.MODEL_ARCH.MMPROJ, "multi_modal_projector.")}
MAX_BLOCKS = 128  # layers the name maps are built for (MedGemma 27B has 62, SigLIP 27)

# The tensor kinds each part may hold, and their transform. Gemma RMSNorms get +1 (see transform);
# SigLIP's LayerNorms are used as stored.
TENSORS: dict[str, dict[gguf.MODEL_TENSOR, str]] = {
    "text": {
        T.TOKEN_EMBD: KEEP, T.OUTPUT: KEEP,  # output only for untied checkpoints; MedGemma ties it
        T.OUTPUT_NORM: GEMMA_NORM, T.ATTN_NORM: GEMMA_NORM,
        T.ATTN_Q: KEEP, T.ATTN_K: KEEP, T.ATTN_V: KEEP, T.ATTN_OUT: KEEP,
        T.ATTN_Q_NORM: GEMMA_NORM, T.ATTN_K_NORM: GEMMA_NORM,  # per head, before RoPE
        T.ATTN_POST_NORM: GEMMA_NORM, T.FFN_PRE_NORM: GEMMA_NORM, T.FFN_POST_NORM: GEMMA_NORM,  # ffn_norm, post_ffw_norm
        T.FFN_GATE: KEEP, T.FFN_UP: KEEP, T.FFN_DOWN: KEEP,
    },
    "vision": {
        T.V_ENC_EMBD_PATCH: KEEP, T.V_ENC_EMBD_POS: KEEP,
        T.V_ENC_INPUT_NORM: KEEP, T.V_ENC_POST_ATTN_NORM: KEEP, T.V_POST_NORM: KEEP,
        T.V_ENC_ATTN_Q: KEEP, T.V_ENC_ATTN_K: KEEP, T.V_ENC_ATTN_V: KEEP, T.V_ENC_ATTN_O: KEEP,
        T.V_ENC_FFN_UP: KEEP, T.V_ENC_FFN_DOWN: KEEP,
    },
    # 4x4 avg-pool (no weights), Gemma RMSNorm, linear vision → text
    "projector": {T.V_MM_SOFT_EMB_NORM: GEMMA_NORM, T.V_MM_INP_PROJ: KEEP},
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


# checkpoints spell the suffix `.weight`/`.bias`; the projector's bare parameter `_weight`
_SUFFIX = re.compile(r"(?P<stem>.+?)(?P<suffix>\.weight|\.bias|_weight)$")


@lru_cache(maxsize=None)
def _name_map(arch: gguf.MODEL_ARCH) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(arch, MAX_BLOCKS)


def map_name(part: str, hf_name: str) -> Mapped:
    """GGUF name and transform for one canonical checkpoint tensor; ExportError if unknown."""
    arch, prefix = PARTS[part]
    m = _SUFFIX.fullmatch(hf_name)
    found = None
    if m:
        name_map = _name_map(arch)
        # canonical names drop the part's prefix; a top-level `lm_head` never had one
        found = name_map.get_type_and_name(prefix + m["stem"]) or name_map.get_type_and_name(m["stem"])
    if found is None or found[0] not in TENSORS[part]:
        raise ExportError(f"no GGUF name for {part} tensor {hf_name!r}; this Gemma 3 variant is not supported")
    tensor, base = found
    return Mapped(base + (".bias" if m["suffix"] == ".bias" else ".weight"), TENSORS[part][tensor])


# --- storage types ----------------------------------------------------------------------------

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
