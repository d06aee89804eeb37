"""Config dataclasses for the two model parts, built from a checkpoint's config.json.

Published MedGemma configs spell out only what differs from transformers' defaults (the 4B
text_config names five keys), so every field carries transformers' default (4.57, Gemma3TextConfig
and SiglipVisionConfig) and the values are then checked against the tensor shapes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from medgemma_edge.runtime.errors import ExportError


def _from_dict(cls, d: dict, **aliases):
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in names and v is not None}
    for field_name, alias in aliases.items():
        if field_name not in kwargs and d.get(alias) is not None:
            kwargs[field_name] = d[alias]
    return cls(**kwargs)


@dataclass
class TextConfig:
    vocab_size: int = 262208  # embedding rows; MedGemma's tokenizer has fewer entries
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0  # global (full-attention) layers
    rope_local_base_freq: float = 10_000.0  # sliding-window layers
    rope_scaling: dict | None = None  # MedGemma 4B: linear, factor 8, global layers only
    sliding_window: int = 4096
    sliding_window_pattern: int = 6  # every 6th layer is global, when layer_types is absent
    layer_types: list[str] | None = None
    max_position_embeddings: int = 131072
    query_pre_attn_scalar: float = 256
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "TextConfig":
        return _from_dict(cls, d, sliding_window_pattern="_sliding_window_pattern")

    def sliding_layers(self) -> list[bool]:
        """True for each layer that attends within the sliding window."""
        if self.layer_types:
            return [t == "sliding_attention" for t in self.layer_types]
        return [(i + 1) % self.sliding_window_pattern != 0 for i in range(self.num_hidden_layers)]

    def linear_rope_factor(self) -> float | None:
        rs = self.rope_scaling or {}
        kind = rs.get("rope_type", rs.get("type"))
        if kind in (None, "default"):
            return None
        if kind != "linear":
            raise ExportError(f"rope scaling {kind!r} is not supported for Gemma 3 GGUF export; "
                              "only 'linear' (as in MedGemma) is")
        return float(rs["factor"])


@dataclass
class VisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 16
    layer_norm_eps: float = 1e-6
    num_channels: int = 3
    # from the top-level Gemma3Config / preprocessor_config.json
    mm_tokens_per_image: int = 256
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    @classmethod
    def from_dicts(cls, vision: dict, top: dict, preprocessor: dict | None) -> "VisionConfig":
        cfg = _from_dict(cls, vision)
        if top.get("mm_tokens_per_image"):
            cfg.mm_tokens_per_image = int(top["mm_tokens_per_image"])
        for key in ("image_mean", "image_std"):
            if preprocessor and preprocessor.get(key):
                setattr(cfg, key, [float(x) for x in preprocessor[key]])
        return cfg

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def pool(self) -> int:
        """Side of the average pool that turns the patch grid into mm_tokens_per_image tokens."""
        per_side = round(self.mm_tokens_per_image ** 0.5)
        return self.patches_per_side // per_side


def check_text(cfg: TextConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    """Config against tensor shapes, and against what llama.cpp's Gemma 3 graph can express."""
    want = {
        "embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
        "layers.0.self_attn.q_proj.weight": (cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size),
        "layers.0.self_attn.k_proj.weight": (cfg.num_key_value_heads * cfg.head_dim, cfg.hidden_size),
        "layers.0.mlp.gate_proj.weight": (cfg.intermediate_size, cfg.hidden_size),
    }
    for name, shape in want.items():
        got = shapes.get(name)
        if got != shape:
            raise ExportError(f"text tensor {name} has shape {got}, config.json implies {shape}; "
                              "config.json does not belong to these weights")
    n_layers = 1 + max(int(n.split(".")[1]) for n in shapes if n.startswith("layers."))
    if n_layers != cfg.num_hidden_layers:
        raise ExportError(f"checkpoint has {n_layers} decoder layers, config.json says "
                          f"{cfg.num_hidden_layers}; the checkpoint is incomplete or mismatched")
    if cfg.attn_logit_softcapping or cfg.final_logit_softcapping:
        # Gemma 3 uses neither; llama.cpp's gemma3 graph has no attention soft-cap and skips the
        # final one whenever layers slide, so such a model would run differently from GGUF
        raise ExportError("logit soft-capping is set, which Gemma 3 does not use and llama.cpp's gemma3 "
                          "graph cannot reproduce; is this a Gemma 2 checkpoint?")
    # llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 27B shape (62 layers)
    implied = cfg.hidden_size / cfg.num_attention_heads if n_layers == 62 else cfg.head_dim
    if abs(cfg.query_pre_attn_scalar - implied) > 1e-6:
        raise ExportError(f"query_pre_attn_scalar {cfg.query_pre_attn_scalar} differs from the {implied} "
                          "llama.cpp derives for this shape; the model cannot be exported to GGUF faithfully")


def check_vision(cfg: VisionConfig, shapes: dict[str, tuple[int, ...]], text_hidden: int) -> None:
    want = {
        "vision/embeddings.patch_embedding.weight": (cfg.hidden_size, cfg.num_channels, cfg.patch_size, cfg.patch_size),
        "vision/embeddings.position_embedding.weight": (cfg.patches_per_side ** 2, cfg.hidden_size),
        "vision/encoder.layers.0.mlp.fc1.weight": (cfg.intermediate_size, cfg.hidden_size),
        "projector/mm_input_projection_weight": (cfg.hidden_size, text_hidden),
    }
    for name, shape in want.items():
        got = shapes.get(name)
        if got != shape:
            raise ExportError(f"{name} has shape {got}, config.json implies {shape}; "
                              "config.json does not belong to these weights")
    n_layers = 1 + max(int(n.split(".")[2]) for n in shapes if n.startswith("vision/encoder.layers."))
    if n_layers != cfg.num_hidden_layers:
        raise ExportError(f"vision tower has {n_layers} layers, config.json says {cfg.num_hidden_layers}")
    if cfg.pool * round(cfg.mm_tokens_per_image ** 0.5) != cfg.patches_per_side:
        raise ExportError(f"{cfg.mm_tokens_per_image} tokens per image do not tile a "
                          f"{cfg.patches_per_side}x{cfg.patches_per_side} patch grid")
