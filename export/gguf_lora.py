"""A PEFT LoRA adapter as a llama.cpp LoRA GGUF: one base bundle, several adapters applied at load.

What llama.cpp reads (src/llama-adapter.cpp, convert_lora_to_gguf.py):
- `general.type` = "adapter", `general.architecture` = the base's ("gemma3"; a mismatch is refused),
  `adapter.type` = "lora", `adapter.lora.alpha` (f32).
- For each changed weight `<gguf name>`: `<gguf name>.lora_a` with ggml ne = [in, r] (PEFT's A
  (r, in) as stored) and `<gguf name>.lora_b` with ne = [r, out] (B (out, r) as stored). llama.cpp
  refuses a pair whose ne[0] of A or ne[1] of B differs from the base tensor's.
- At run time it adds `s · B (A x)` with s = user scale · alpha / r (r = A's rank; alpha 0 means
  s = user scale). It knows nothing of rsLoRA or per-module alpha, so alpha is written as
  lora_alpha (· sqrt(r) for rsLoRA) and any module whose PEFT scale still differs gets the ratio
  folded into its B.

Only text-decoder Linear LoRAs fit: llama.cpp applies adapters to the text model alone (not the
mmproj), a tied embedding is also the output head (a LoRA on `token_embd` would reach both), and
modules_to_save are whole weights, not low-rank terms. Such adapters are refused here with a line
saying to merge instead (`export --adapter`).
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np

from medgemma_edge.export.checkpoint import Checkpoint
from medgemma_edge.export.gguf_tensors import KEEP, map_name
from medgemma_edge.export.gguf_text import ARCH
from medgemma_edge.export.lora import Adapter
from medgemma_edge.runtime.errors import ExportError

# Ours, read back by runtime/backends/llama_engine.py through llama_adapter_meta_val_str: the
# base checkpoint's config digest (the bundle manifest's source.config_sha256), so a LoRA is only
# applied to the model it was made for.
KEY_BASE_CONFIG = "medgemma_edge.base.config_sha256"
KEY_ADAPTER_SHA = "medgemma_edge.adapter.sha256"
LORA_TYPES = {"f32": np.float32, "f16": np.float16}  # gguf-py stores numpy's dtype as is


def check_lora_fits(adapter: Adapter) -> None:
    """ExportError unless every change of `adapter` can be a llama.cpp LoRA on the text model."""
    name = adapter.path.name
    if adapter.full:
        mods = ", ".join(sorted(n.removesuffix(".weight") for _, n in adapter.full))
        raise ExportError(f"adapter {name} saves whole modules ({mods}, modules_to_save), which a llama.cpp "
                          "LoRA cannot hold; export it merged with --adapter and no --lora-out")
    other = sorted({p for p, _ in adapter.terms if p != "text"})
    if other:
        raise ExportError(f"adapter {name} also changes the {' and '.join(other)} (e.g. all-linear targets); "
                          "llama.cpp applies a LoRA to the text model only — export it merged with --adapter")
    for (_, hf), term in adapter.terms.items():
        if term.embedding or hf in ("embed_tokens.weight", "lm_head.weight"):
            raise ExportError(f"adapter {name} changes {hf.removesuffix('.weight')}, which Gemma ties to the "
                              "output head; a llama.cpp LoRA would change both — export it merged with --adapter")


def write_lora_gguf(ckpt: Checkpoint, adapter: Adapter, out, quant: str = "f32") -> Path:
    """Write `adapter` (checked against `ckpt`, the unmerged base) as a llama.cpp LoRA GGUF at `out`."""
    from medgemma_edge.export.lora import merge_adapter

    if quant not in LORA_TYPES:
        raise ExportError(f"a LoRA GGUF is written as {' or '.join(LORA_TYPES)}, not {quant!r}")
    check_lora_fits(adapter)
    merge_adapter(ckpt, adapter)  # the shape and name checks, the same as for a merged export
    if adapter.alpha <= 0:  # llama.cpp reads alpha 0 as "scale 1", PEFT as "no change"
        raise ExportError(f"adapter {adapter.path.name} has lora_alpha {adapter.alpha}: it changes nothing")
    rank = adapter.rank
    alpha = adapter.alpha * math.sqrt(rank) if adapter.rslora else adapter.alpha
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out), ARCH)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    w.add_name(adapter.path.name)
    w.add_string(KEY_BASE_CONFIG, ckpt.config_sha256())
    w.add_string(KEY_ADAPTER_SHA, adapter.weights_sha256())
    for (part, hf), term in sorted(adapter.terms.items()):
        mapped = map_name(part, hf)
        if mapped.kind != KEEP:
            raise ExportError(f"adapter {adapter.path.name} changes {hf}, a norm llama.cpp transforms; "
                              "export it merged with --adapter")
        a, b = term.factors()  # (r, in), (out, r)
        # what llama.cpp will apply: alpha / r_module; fold the rest of PEFT's scale into B
        ratio = term.scale / (alpha / term.rank)
        if abs(ratio - 1.0) > 1e-7:
            b = b * np.float32(ratio)
        for suffix, arr in ((".lora_a", a), (".lora_b", b)):
            w.add_tensor(mapped.gguf_name + suffix, np.ascontiguousarray(arr, dtype=LORA_TYPES[quant]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def export_lora(src, adapter_dir, out, quant: str = "f32") -> Path:
    """The `--lora-out` path: read SRC (the base) and the PEFT folder, write the LoRA GGUF."""
    from medgemma_edge.export.checkpoint import open_checkpoint
    from medgemma_edge.export.lora import read_adapter

    ckpt = open_checkpoint(src)
    return write_lora_gguf(ckpt, read_adapter(adapter_dir, ckpt.architecture), out, quant)
