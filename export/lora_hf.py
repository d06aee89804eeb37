"""A PEFT LoRA merged and written back as a Hugging Face checkpoint folder.

For converters that read a checkpoint folder themselves (onnxruntime-genai's builder behind the
ONNX decoder): export/lora.py merges while reading; this writes that merged view out, so the ONNX
bundle is made from it exactly as from any checkpoint.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from medgemma_edge.export.checkpoint import MULTIMODAL, Checkpoint

_HF_PREFIX = {MULTIMODAL: {"text": "model.language_model.", "vision": "model.vision_tower.vision_model.",
                           "projector": "model.multi_modal_projector."}}
SHARD_BYTES = 2 << 30


def write_merged_checkpoint(ckpt: Checkpoint, out_dir) -> Path:
    """Write `ckpt` (merged) as a safetensors checkpoint folder in `out_dir`, in shards of about
    2 GB, each tensor in its base dtype (as peft's merge_and_unload would save it); the other files
    of the source folder (tokenizer, chat template, preprocessor) are copied beside it."""
    import torch
    from safetensors.torch import save_file

    from medgemma_edge.export.checkpoint import read_rows

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in ckpt.path.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json", ".bin", ".pth")):
            shutil.copy2(f, out / f.name)
    prefixes = _HF_PREFIX.get(ckpt.architecture, {"text": "model."})
    torch_dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
    weight_map, shard, shard_bytes, shards = {}, {}, 0, []

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shards.append(name)
            shard, shard_bytes = {}, 0

    from medgemma_edge.export.checkpoint import open_checkpoint

    base_dtypes = {k: r.dtype for k, r in open_checkpoint(ckpt.path).tensors.items()}
    for (part, name), ref in sorted(ckpt.tensors.items()):
        stored = "lm_head.weight" if (part, name) == ("text", "lm_head.weight") else prefixes[part] + name
        # a merged tensor goes back in its base dtype; the rest (copies, the adapter's trained
        # modules) as they are stored
        dtype = base_dtypes.get((part, name), "f32") if ref.deltas else ref.dtype
        t = torch.from_numpy(read_rows(ref)).to(torch_dtype[dtype])
        shard[stored] = t.contiguous()
        shard_bytes += t.numel() * t.element_size()
        if shard_bytes >= SHARD_BYTES:
            flush()
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    base_tied = ("text", "lm_head.weight") not in open_checkpoint(ckpt.path).tensors
    if base_tied and ("text", "lm_head.weight") in ckpt.tensors:  # untied by the adapter
        config = dict(ckpt.config)
        config["tie_word_embeddings"] = False
        if "text_config" in config:
            config["text_config"] = {**config["text_config"], "tie_word_embeddings": False}
        (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def export_onnx_merged(src, out, *args, adapter, **kwargs):
    """export/bundle_onnx.export_onnx with the PEFT LoRA in `adapter` merged first: the merged
    checkpoint is written to a scratch folder beside `out` (named as SRC, so the bundle's file names
    and source name stay SRC's), exported, then removed; the manifest records the adapter."""
    from medgemma_edge.export.bundle_onnx import export_onnx
    from medgemma_edge.export.lora import open_with_adapter, read_adapter
    from medgemma_edge.runtime.manifest import write_manifest

    src, out = Path(src).expanduser(), Path(out).expanduser()
    ckpt = open_with_adapter(src, adapter)
    entry = read_adapter(adapter, ckpt.architecture).manifest_entry()
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".merging-", dir=out.parent))
    try:
        merged = write_merged_checkpoint(ckpt, scratch / src.name)
        res = export_onnx(merged, out, *args, **kwargs)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    res.manifest["adapter"] = entry
    write_manifest(res.bundle, res.manifest)
    return res
