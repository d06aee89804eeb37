"""A local Hugging Face Gemma 3 checkpoint, read tensor by tensor.

Knows the two spellings of MedGemma's tensor names and maps both onto one canonical form,
`(part, name)` with part in {"text", "vision", "projector"} and name relative to that part
(`layers.0.self_attn.q_proj.weight`, `embeddings.patch_embedding.weight`, ...). Nothing here
holds a whole model: tensors are opened lazily from safetensors and read in row slices.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medgemma_edge.runtime.errors import ExportError

MULTIMODAL = "Gemma3ForConditionalGeneration"
TEXT_ONLY = "Gemma3ForCausalLM"
SUPPORTED = (MULTIMODAL, TEXT_ONLY)

# Prefix → part. Published MedGemma files use the first spelling of each pair; transformers
# >= 4.52 saves the second. Gemma3ForCausalLM (MedGemma 27B text) uses plain `model.`; it comes
# last so that `model.language_model.` is tried before it.
PREFIXES = (
    ("language_model.model.", "text"),
    ("model.language_model.", "text"),
    ("vision_tower.vision_model.", "vision"),
    ("model.vision_tower.vision_model.", "vision"),
    ("multi_modal_projector.", "projector"),
    ("model.multi_modal_projector.", "projector"),
    ("model.", "text"),
)
# The LM head: tied to the embedding in every MedGemma, written only when a checkpoint unties it.
LM_HEAD_NAMES = ("lm_head.weight", "language_model.lm_head.weight")
# SigLIP's pooling head (vision_use_head=True) is not used by Gemma 3: the projector reads the
# last hidden state. Dropped, as llama.cpp does.
IGNORED_PREFIXES = ("vision_tower.vision_model.head.", "model.vision_tower.vision_model.head.")

# config.json written from a bare config object has no `architectures`; model_type decides then.
MODEL_TYPES = {"gemma3": MULTIMODAL, "gemma3_text": TEXT_ONLY}
_DTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: file, stored name, shape, stored dtype."""

    file: Path
    stored_name: str
    shape: tuple[int, ...]
    dtype: str  # "f32" | "f16" | "bf16"
    # LoRA terms merged into this tensor as it is read (export/lora.py: objects with
    # `rows(start, stop)` giving the float32 delta of those rows)
    deltas: tuple = ()


@dataclass
class Checkpoint:
    path: Path
    architecture: str
    config: dict
    text_config: dict
    vision_config: dict | None
    tensors: dict[tuple[str, str], TensorRef] = field(repr=False)

    @property
    def multimodal(self) -> bool:
        return self.vision_config is not None

    def config_sha256(self) -> str:
        return hashlib.sha256((self.path / "config.json").read_bytes()).hexdigest()


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{what} not found: {path}; point SRC at a Hugging Face checkpoint folder") from None
    except json.JSONDecodeError as err:
        raise ExportError(f"{path.name} is not valid JSON ({err.msg} at line {err.lineno}); re-download it") from None


def _weight_files(src: Path) -> list[Path]:
    """The safetensors files of a checkpoint, checking that every shard the index names exists."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index, "shard index")["weight_map"].values()))
        missing = [s for s in shards if not (src / s).is_file()]
        if missing:
            raise ExportError(f"{len(missing)} of {len(shards)} shards missing in {src} (first: {missing[0]}); "
                              "download the complete checkpoint")
        return [src / s for s in shards]
    single = src / "model.safetensors"
    if single.is_file():
        return [single]
    if any(src.glob("*.bin")) or any(src.glob("*.pth")):
        raise ExportError(f"{src} holds PyTorch .bin weights only; save it with safetensors "
                          "(model.save_pretrained(dir, safe_serialization=True)) and export that")
    raise ExportError(f"no model.safetensors or model.safetensors.index.json in {src}; "
                      "point SRC at a Hugging Face checkpoint folder")


def _canonical(stored: str, architecture: str) -> tuple[str, str] | None:
    """(part, name) for a stored tensor name; None for tensors Gemma 3 inference does not use."""
    if stored in LM_HEAD_NAMES:
        return ("text", "lm_head.weight")
    if stored.startswith(IGNORED_PREFIXES):
        return None
    for prefix, part in PREFIXES:
        if stored.startswith(prefix):
            if part != "text" and architecture == TEXT_ONLY:
                break
            if prefix == "model." and architecture == MULTIMODAL:
                break  # `model.` alone is the causal-LM spelling; in a multimodal file it is unknown
            return (part, stored[len(prefix):])
    raise ExportError(f"unexpected tensor {stored!r} in a {architecture} checkpoint; "
                      "is this a Gemma 3 / MedGemma model?")


def _scan(files: list[Path], architecture: str) -> dict[tuple[str, str], TensorRef]:
    from safetensors import safe_open

    tensors: dict[tuple[str, str], TensorRef] = {}
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt")
        except Exception as err:  # safetensors raises its own error types for truncated files
            raise ExportError(f"cannot read {file.name}: {err}; the file is damaged or incomplete, "
                              "download it again") from None
        with handle as f:
            for stored in f.keys():
                key = _canonical(stored, architecture)
                if key is None:
                    continue
                sl = f.get_slice(stored)
                dtype = _DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise ExportError(f"tensor {stored!r} is {sl.get_dtype()}; only F32, F16 and BF16 "
                                      "checkpoints can be exported (dequantize it first)")
                if key in tensors:
                    raise ExportError(f"tensor {key[0]}:{key[1]} appears twice ({stored!r}); "
                                      "the checkpoint mixes two models")
                tensors[key] = TensorRef(file, stored, tuple(sl.get_shape()), dtype)
    return tensors


def open_checkpoint(src: str | Path) -> Checkpoint:
    """Read config and tensor index of a Gemma 3 checkpoint; raises ExportError for anything else."""
    src = Path(src).expanduser()
    if not src.is_dir():
        raise ExportError(f"{src} is not a folder; point SRC at a local Hugging Face checkpoint folder")
    config = _read_json(src / "config.json", "config.json")
    archs = config.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED), None)
    if arch is None and not archs:
        arch = MODEL_TYPES.get(config.get("model_type"))
    if arch is None:
        kind = archs or f"model_type {config.get('model_type')!r}"
        raise ExportError(f"{src.name} is {kind}; only {MULTIMODAL} "
                          f"(MedGemma 4B / 27B) and {TEXT_ONLY} (MedGemma 27B text) can be exported")
    text_config = config.get("text_config", config) if arch == MULTIMODAL else config
    vision_config = config.get("vision_config") if arch == MULTIMODAL else None
    if arch == MULTIMODAL and vision_config is None:
        raise ExportError(f"{src.name}/config.json has no vision_config; the checkpoint is incomplete")
    tensors = _scan(_weight_files(src), arch)
    tied = bool(config.get("tie_word_embeddings", text_config.get("tie_word_embeddings", True)))
    if tied:
        tensors.pop(("text", "lm_head.weight"), None)
    for need in (("text", "embed_tokens.weight"), ("text", "norm.weight")):
        if need not in tensors:
            raise ExportError(f"tensor {need[1]} missing from {src.name}; the checkpoint is incomplete")
    if arch == MULTIMODAL and not any(p == "projector" for p, _ in tensors):
        raise ExportError(f"no multi_modal_projector tensors in {src.name}; the checkpoint is incomplete")
    return Checkpoint(src, arch, config, text_config, vision_config, tensors)


def read_rows(ref: TensorRef, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows [start, stop) of a tensor (all of it for 1-D) as float32 numpy.

    Reads only the requested slice, so a 262k-row embedding can be converted in pieces.
    bf16 has no numpy dtype: torch widens it to float32 exactly.
    """
    import torch
    from safetensors import safe_open

    with safe_open(str(ref.file), framework="pt") as f:
        sl = f.get_slice(ref.stored_name)
        t = sl[start:stop] if len(ref.shape) > 1 else sl[:]
    rows = t.to(torch.float32).numpy()
    for term in ref.deltas:
        rows = rows + term.rows(start, stop)
    return rows
