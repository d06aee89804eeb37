"""A manifest for GGUF files that our export did not write: llama.cpp's converter, community
downloads, LM Studio's folder, Ollama's store.

`gguf_manifest(text, mmproj)` reads both headers (runtime/gguf_meta.py), checks that they are a
Gemma 3 text model and a Gemma 3 projector that fit it, each refusal one line naming the file, and
describes them the way an exported bundle's manifest does: architecture, context, image size and
tokens per image, the chat template and special tokens, every file's size and sha256, `source`
kind "imported" and no quality report (nothing was measured against a checkpoint here).
"""

from __future__ import annotations

from pathlib import Path

from medgemma_edge.runtime import __version__
from medgemma_edge.runtime.chat import IMAGE_TOKENS
from medgemma_edge.runtime.errors import BundleError, InputError
from medgemma_edge.runtime.gguf_find import FUSED, fused
from medgemma_edge.runtime.gguf_meta import GGUFInfo, read_gguf_info
from medgemma_edge.runtime.manifest import FORMAT_VERSION, sha256_file

ARCH = "gemma3"
PROJECTOR = "gemma3"
N_MERGE = 4  # llama.cpp's clip.cpp: Gemma 3 pools 4×4 patches unless clip.vision.projector.scale_factor says
SPECIAL = ("start_of_turn", "end_of_turn", "start_of_image", "end_of_image", "image_soft_token")
ADD_MMPROJ = "add --mmproj MMPROJ.gguf (the projector file published beside the model, mmproj-….gguf)"


def text_info(path: Path) -> GGUFInfo:
    """The header of a Gemma 3 text GGUF; one-line BundleError for anything else."""
    info = read_gguf_info(path)
    name, arch, kind = Path(path).name, info.architecture, info.get("general.type")
    if arch == "clip" or kind == "mmproj":
        raise BundleError(f"{name} is a vision projector (mmproj), not a text model — give the model's text "
                          "GGUF, and this file as --mmproj")
    if kind == "adapter":
        raise BundleError(f"{name} is a LoRA adapter, not a model — give its base model, with --lora {name}")
    parts = info.get("split.count")
    if isinstance(parts, int) and parts > 1:
        raise BundleError(f"{name} is one of {parts} parts of a split GGUF — join them with llama.cpp's "
                          "`llama-gguf-split --merge FIRST.gguf JOINED.gguf` and give the joined file")
    if arch != ARCH:
        raise BundleError(f"{name} is a {str(arch)[:30]!r} model, not Gemma 3 — medgemma-edge runs Gemma 3 models "
                          "(MedGemma); give a Gemma 3 GGUF")
    if fused(info):
        raise BundleError(FUSED.format(what=name))
    for key in ("embedding_length", "block_count"):
        if not isinstance(info.get(f"{ARCH}.{key}"), int):
            raise BundleError(f"{name} lacks {ARCH}.{key} in its header — convert it again with llama.cpp")
    if "token_embd.weight" not in info.tensors:
        raise BundleError(f"{name} has no token embedding tensor — it is not a complete model; download it again")
    return info


def projector_info(path: Path, text: GGUFInfo) -> tuple[GGUFInfo, dict]:
    """The header of a Gemma 3 projector that fits `text`, and the manifest's "image" record."""
    info = read_gguf_info(path)
    name, tname = Path(path).name, text.path.name
    if info.architecture != "clip":
        raise BundleError(f"{name} is not a vision projector (general.architecture {str(info.architecture)[:30]!r})"
                          " — give the mmproj-….gguf file as --mmproj")
    if not info.get("clip.has_vision_encoder"):
        raise BundleError(f"{name} has no vision encoder — give the model's image projector as --mmproj")
    ptype = info.get("clip.projector_type", info.get("clip.vision.projector_type"))
    if ptype != PROJECTOR:
        raise BundleError(f"{name} is a {str(ptype)[:30]!r} projector, not Gemma 3's — give the mmproj made for "
                          f"{tname}")
    width, n_embd = info.get("clip.vision.projection_dim"), text.get(f"{ARCH}.embedding_length")
    if width != n_embd:
        raise BundleError(f"{name} gives image tokens {width} values wide, {tname} takes {n_embd} — the projector "
                          f"belongs to another model size; give the mmproj made for {tname}")
    size, patch = info.get("clip.vision.image_size"), info.get("clip.vision.patch_size")
    merge = info.get("clip.vision.projector.scale_factor", N_MERGE)
    if not all(isinstance(v, int) and v > 0 for v in (size, patch, merge)) or size % (patch * merge):
        raise BundleError(f"{name} has image size {size} with patches of {patch} pooled by {merge}, which do not "
                          "tile — not a Gemma 3 projector this runtime can run")
    tokens = (size // patch // merge) ** 2
    if tokens != IMAGE_TOKENS:
        raise BundleError(f"{name} makes {tokens} tokens per image; Gemma 3 text models take {IMAGE_TOKENS} — give "
                          f"the mmproj made for {tname}")
    if text.token_id("<image_soft_token>") is None:
        raise BundleError(f"{tname}'s vocabulary has no <image_soft_token>, which images need — convert it again "
                          "with a current llama.cpp")
    image = {"size": size, "patch_size": patch, "tokens_per_image": tokens}
    for key in ("mean", "std"):
        value = info.get(f"clip.vision.image_{key}")
        if isinstance(value, list) and len(value) == 3 and all(isinstance(x, (int, float)) for x in value):
            image[key] = [float(x) for x in value]
    return info, image


def special_tokens(text: GGUFInfo) -> dict:
    out = {"bos": text.get("tokenizer.ggml.bos_token_id"), "eos": text.get("tokenizer.ggml.eos_token_id"),
           "pad": text.get("tokenizer.ggml.padding_token_id")}
    out = {k: v if isinstance(v, int) and not isinstance(v, bool) else None for k, v in out.items()}
    for key in SPECIAL:
        out[key] = text.token_id(f"<{key}>")
    if out["start_of_turn"] is None or out["end_of_turn"] is None:
        raise BundleError(f"{text.path.name} has no <start_of_turn>/<end_of_turn> tokens — not a Gemma 3 chat "
                          "vocabulary; convert it again with llama.cpp")
    return out


def gguf_manifest(text: Path, mmproj: Path | None = None, *, origin: str = "GGUF", sha256=sha256_file) -> dict:
    """The manifest describing `text` (+ `mmproj`), every check done first; files listed by absolute
    path (an in-memory bundle; `import` lists its own copies instead). `sha256(path)` hashes a file
    (a caller may remember hashes)."""
    text, mmproj = Path(text), (Path(mmproj) if mmproj is not None else None)
    if mmproj is not None and mmproj.resolve() == text.resolve():
        raise InputError(f"{text.name} is given as both the model and --mmproj — give the projector file as --mmproj")
    tinfo = text_info(text)
    image, minfo = None, None
    if mmproj is not None:
        minfo, image = projector_info(mmproj, tinfo)
    files = [{"role": "text", "path": str(text.resolve()), "size": text.stat().st_size, "sha256": sha256(text)}]
    if mmproj is not None:
        files.append({"role": "vision", "path": str(mmproj.resolve()), "size": mmproj.stat().st_size,
                      "sha256": sha256(mmproj), "quant": minfo.quant, "fidelity": None})
    tokens = tinfo.get("tokenizer.ggml.tokens")
    embd = tinfo.tensors["token_embd.weight"]
    template = tinfo.get("tokenizer.chat_template")
    context = tinfo.get(f"{ARCH}.context_length")
    return {
        "format_version": FORMAT_VERSION, "backend": "gguf", "tool": f"medgemma-edge {__version__} (import)",
        "source": {"kind": "imported", "origin": origin, "path_name": text.name, "architecture": ARCH,
                   "name": str(tinfo.get("general.name") or "")[:200] or None},
        "quantization": {"text": tinfo.quant, "vision": minfo.quant if minfo else None},
        "files": files, "image": image,
        "chat_template": template if isinstance(template, str) and template.strip() else None,
        "special_tokens": special_tokens(tinfo),
        "context_length": context if isinstance(context, int) else None,
        "vocab": {"tokenizer_entries": len(tokens) if isinstance(tokens, list) else None,
                  "embedding_rows": embd[1] if len(embd) > 1 else None, "padded": False},
        "quality": None,
    }


def imported(manifest: dict) -> bool:
    return (manifest.get("source") or {}).get("kind") == "imported"


def no_quality_line(manifest: dict) -> str | None:
    """What `verify` and `--stats` say of a bundle with no quality report."""
    if manifest.get("quality"):
        return None
    if imported(manifest):
        return ("imported GGUF: no quality report — its files were made elsewhere and were not measured against "
                "a checkpoint here (export from the checkpoint for one)")
    return "no quality report (exported with --no-quality)"
