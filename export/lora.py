"""A PEFT LoRA adapter (peft / TRL `save_pretrained`) read and merged into a checkpoint.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors`. Its tensors are
named after the PeftModel's modules: `base_model.model.<module>.lora_A.weight` (r, in) and
`.lora_B.weight` (out, r) for a Linear, `.lora_embedding_A` (r, vocab) / `.lora_embedding_B`
(hidden, r) for an Embedding, and `base_model.model.<module>.weight` for a module in
`modules_to_save` (a full trained copy: Google's MedGemma notebook saves lm_head and
embed_tokens that way). PEFT computes `W x + scale · B (A x)` with scale = alpha / r
(alpha / sqrt(r) with use_rslora), so merging is `W + scale · B @ A`.

The merge is a hook where the exporter reads tensors: `merge_adapter` returns a Checkpoint whose
TensorRefs carry their LoRA terms (`TensorRef.deltas`) or point at the adapter's full copy, and
`checkpoint.read_rows` adds the terms slice by slice, so export still streams. Every format
reading through read_rows (GGUF text and mmproj, the ONNX vision trace) gets the merged weights;
`write_merged_checkpoint` writes them back as a Hugging Face folder for the ONNX decoder builder.
"""

from __future__ import annotations

import hashlib
import math
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from medgemma_edge.export.checkpoint import (LM_HEAD_NAMES, MULTIMODAL, Checkpoint, TensorRef, _canonical,
                                             _DTYPES, _read_json)
from medgemma_edge.runtime.errors import ExportError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# adapter_config.json fields whose non-default value changes the forward pass in a way a plain
# `W + scale·B@A` merge does not reproduce
UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "LoRA bias terms", "target_parameters": "LoRA on parameters",
               "trainable_token_indices": "trainable tokens", "layer_replication": "layer replication",
               "use_qalora": "QA-LoRA", "alora_invocation_tokens": "activated LoRA"}
_LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<which>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight)?$")


@dataclass(frozen=True)
class LoraTerm:
    """`scale · B @ A` for one weight, read from the adapter file when needed."""

    file: Path
    a_name: str  # (r, in); (r, vocab) for an embedding
    b_name: str  # (out, r); (hidden, r) for an embedding
    rank: int
    scale: float
    embedding: bool = False  # PEFT's Embedding LoRA: the delta is (B @ A).T

    def rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of the delta, float32."""
        a, b = self.factors()
        if self.embedding:  # delta (vocab, hidden) = A.T @ B.T
            return (self.scale * (a[:, start:stop].T.astype(np.float64) @ b.T)).astype(np.float32)
        return (self.scale * (b[start:stop].astype(np.float64) @ a)).astype(np.float32)

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        """(A, B) as stored, float32."""
        return _read(self.file, self.a_name), _read(self.file, self.b_name)


def _read(file: Path, name: str) -> np.ndarray:
    import torch
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor(name).to(torch.float32).numpy()


@dataclass
class Adapter:
    path: Path
    config: dict
    weights: Path
    terms: dict[tuple[str, str], LoraTerm] = field(repr=False)  # (part, canonical name) → LoRA term
    full: dict[tuple[str, str], TensorRef] = field(repr=False)  # modules_to_save copies

    @property
    def alpha(self) -> float:
        return float(self.config.get("lora_alpha", 8))

    @property
    def rank(self) -> int:
        return int(self.config.get("r", 8))

    @property
    def rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    def target_modules(self) -> list[str]:
        """The module kinds the LoRA terms touch (q_proj, down_proj, ...), sorted."""
        return sorted({n.removesuffix(".weight").rsplit(".", 1)[-1] for _, n in self.terms})

    def weights_sha256(self) -> str:
        h = hashlib.sha256()
        with open(self.weights, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        return h.hexdigest()

    def manifest_entry(self) -> dict:
        """What a bundle records about the adapter merged into it (no local paths: names only)."""
        base = str(self.config.get("base_model_name_or_path") or "")
        return {"name": self.path.name, "base_model": base.rstrip("/").rsplit("/", 1)[-1] or None,
                "r": self.rank, "alpha": self.alpha, "use_rslora": self.rslora,
                "target_modules": self.target_modules(),
                "parts": sorted({p for p, _ in self.terms} | {p for p, _ in self.full}),
                "modules_to_save": sorted(n.removesuffix(".weight") for _, n in self.full),
                "weights_sha256": self.weights_sha256()}


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches the module path or its tail."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def read_adapter(path, architecture: str = MULTIMODAL) -> Adapter:
    """Read and check a PEFT LoRA folder; ExportError (one line) for anything it cannot merge."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_dir():
        raise ExportError(f"--adapter {path} is not a folder; point it at what peft's save_pretrained wrote")
    config = _read_json(path / CONFIG_NAME, "adapter_config.json")
    kind = config.get("peft_type")
    if kind != "LORA":
        raise ExportError(f"{path.name} is a {kind or 'unknown'} adapter; only LoRA adapters can be merged")
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise ExportError(f"{path.name} uses {what} ({key}), which a merge into plain weights does not "
                              "reproduce; train a plain LoRA or merge it with peft's merge_and_unload")
    if config.get("fan_in_fan_out"):
        raise ExportError(f"{path.name} has fan_in_fan_out=true (GPT-2 style Conv1D); Gemma 3 has none")
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        hint = (" (only adapter_model.bin: save it with safe_serialization=True)"
                if (path / "adapter_model.bin").is_file() else "")
        raise ExportError(f"no {WEIGHTS_NAME} in {path}{hint}")
    try:
        handle = safe_open(str(weights), framework="pt")
    except Exception as err:
        raise ExportError(f"cannot read {weights.name}: {err}; the file is damaged, save the adapter again") from None
    pairs: dict[str, dict] = {}
    full: dict[tuple[str, str], TensorRef] = {}
    with handle as f:
        for stored in f.keys():
            sl = f.get_slice(stored)
            dtype = _DTYPES.get(sl.get_dtype())
            if dtype is None:
                raise ExportError(f"adapter tensor {stored!r} is {sl.get_dtype()}; only F32/F16/BF16 adapters "
                                  "can be merged")
            name = stored.removeprefix(PEFT_PREFIX)
            m = _LORA_KEY.fullmatch(name)
            if m:
                pairs.setdefault(m["module"], {})[m["which"]] = (stored, tuple(sl.get_shape()))
            else:
                full[_key(name, architecture, path)] = TensorRef(weights, stored, tuple(sl.get_shape()), dtype)
    terms = {}
    for module, got in pairs.items():
        embedding = "lora_embedding_A" in got or "lora_embedding_B" in got
        a = got.get("lora_embedding_A" if embedding else "lora_A")
        b = got.get("lora_embedding_B" if embedding else "lora_B")
        if a is None or b is None:
            raise ExportError(f"{path.name} has only one of the LoRA pair for {module}; the adapter is incomplete")
        rank = a[1][0]
        if b[1][-1] != rank:
            raise ExportError(f"{path.name}: {module} has lora_A rank {rank} but lora_B rank {b[1][-1]}")
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        terms[_key(module + ".weight", architecture, path)] = LoraTerm(weights, a[0], b[0], rank, scale, embedding)
    if not terms and not full:
        raise ExportError(f"{weights.name} in {path.name} holds no LoRA tensors")
    return Adapter(path, config, weights, terms, full)


def _key(name: str, architecture: str, path: Path) -> tuple[str, str]:
    """Canonical (part, name) of an adapter module, as export/checkpoint names checkpoint tensors."""
    if name in LM_HEAD_NAMES:
        return ("text", "lm_head.weight")
    try:
        key = _canonical(name, architecture)
    except ExportError:
        key = None
    if key is None:
        raise ExportError(f"adapter {path.name} changes {name!r}, which a {architecture} checkpoint does not "
                          "have; the adapter was trained on another model")
    return key


def merge_adapter(ckpt: Checkpoint, adapter: Adapter) -> Checkpoint:
    """The checkpoint as the PeftModel computes it; ExportError when the adapter does not fit it.

    Gemma ties the LM head to the embedding. PEFT keeps that tie only for what it leaves alone:
    a trained copy of embed_tokens or lm_head (modules_to_save) or a LoRA on either leaves the
    other one at the base weights, so the merged checkpoint gets an explicit lm_head then.
    """
    base_class = (adapter.config.get("auto_mapping") or {}).get("base_model_class")
    if base_class and base_class != ckpt.architecture:
        raise ExportError(f"adapter {adapter.path.name} was trained on a {base_class}, SRC is a "
                          f"{ckpt.architecture}; use the adapter's own base model")
    tensors = dict(ckpt.tensors)
    head, embed = ("text", "lm_head.weight"), ("text", "embed_tokens.weight")
    touched = set(adapter.terms) | set(adapter.full)
    if head not in tensors and touched & {head, embed}:
        tensors[head] = tensors[embed]  # untie: the head keeps the base embedding unless replaced
    for key, ref in adapter.full.items():
        base = _base_ref(tensors, key, adapter)
        if base.shape != ref.shape:
            raise ExportError(f"adapter {adapter.path.name} replaces {key[1]} with shape {ref.shape}, the "
                              f"checkpoint's is {base.shape}; the adapter belongs to another model")
        tensors[key] = ref
    for key, term in adapter.terms.items():
        base = _base_ref(tensors, key, adapter)
        a, b = _shape(term.file, term.a_name), _shape(term.file, term.b_name)
        # Linear W (out, in): A (r, in), B (out, r). Embedding (vocab, hidden): A (r, vocab), B (hidden, r)
        if len(base.shape) == 2:
            rows, cols = base.shape[::-1] if term.embedding else base.shape
            fits = a == (term.rank, cols) and b == (rows, term.rank)
        else:
            fits = False
        if not fits:
            raise ExportError(f"adapter {adapter.path.name}: LoRA for {key[1]} has A {a} and B {b}, which do not "
                              f"fit the checkpoint's {base.shape}; the adapter belongs to another model")
        # merged values are no longer exact in a 16-bit type: the unquantized reference becomes f32
        tensors[key] = replace(base, dtype="f32", deltas=base.deltas + (term,))
    _note_base_name(ckpt, adapter)
    return replace(ckpt, tensors=tensors)


def _base_ref(tensors: dict, key: tuple[str, str], adapter: Adapter) -> TensorRef:
    if key not in tensors:
        raise ExportError(f"adapter {adapter.path.name} changes {key[0]} tensor {key[1]}, which the checkpoint "
                          "does not have; the adapter belongs to another model")
    return tensors[key]


def _shape(file: Path, name: str) -> tuple[int, ...]:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return tuple(f.get_slice(name).get_shape())


def _note_base_name(ckpt: Checkpoint, adapter: Adapter) -> None:
    """A different base name is only a note: a local copy of google/medgemma-4b-it may have any
    folder name, and the shapes checked in merge_adapter are what decide."""
    base = str(adapter.config.get("base_model_name_or_path") or "").rstrip("/").rsplit("/", 1)[-1]
    known = {ckpt.path.name, str(ckpt.config.get("_name_or_path") or "").rstrip("/").rsplit("/", 1)[-1]}
    if base and base not in known:
        print(f"note: adapter {adapter.path.name} names its base {base!r}, SRC is {ckpt.path.name!r}; "
              "merging since every shape fits", file=sys.stderr)


def open_with_adapter(src, adapter_dir) -> Checkpoint:
    """open_checkpoint(src) with the adapter in `adapter_dir` merged (none: as is)."""
    from medgemma_edge.export.checkpoint import open_checkpoint

    ckpt = open_checkpoint(src)
    if adapter_dir is None:
        return ckpt
    return merge_adapter(ckpt, read_adapter(adapter_dir, ckpt.architecture))
